// A real OpenID Connect provider for the console's sign-in tests: the certified `oidc-provider` package, run with
// the machine's Node.js, its own login and consent pages (devInteractions: any password is accepted).
//
//   node provider.mjs PORT   with the environment:
//     OIDC_CLIENT_ID, OIDC_CLIENT_SECRET, OIDC_REDIRECT_URI   the gateway, registered as a confidential web client
//     OIDC_ACCOUNTS   JSON: {login: {email, portcullis_role, portcullis_team}, ...}: who may sign in, their claims
//
// The authorization code flow with PKCE (required), client_secret_basic at the token endpoint, the claims in the
// ID token. It prints "ready" once it listens.
import Provider from 'oidc-provider';

const port = Number(process.argv[2]);
const accounts = JSON.parse(process.env.OIDC_ACCOUNTS);

const provider = new Provider(`http://127.0.0.1:${port}`, {
  clients: [
    {
      client_id: process.env.OIDC_CLIENT_ID,
      client_secret: process.env.OIDC_CLIENT_SECRET,
      redirect_uris: [process.env.OIDC_REDIRECT_URI],
      grant_types: ['authorization_code'],
      response_types: ['code'],
      token_endpoint_auth_method: 'client_secret_basic',
    },
  ],
  pkce: { required: () => true },
  scopes: ['openid', 'email', 'portcullis'],
  claims: { openid: ['sub'], email: ['email', 'email_verified'], portcullis: ['portcullis_role', 'portcullis_team'] },
  // The claims asked for by scope go in the ID token itself (not only at the userinfo endpoint).
  conformIdTokenClaims: false,
  async findAccount(ctx, id) {
    const account = accounts[id];
    if (!account) return undefined;
    return { accountId: id, async claims() { return { sub: id, ...account }; } };
  },
  cookies: { keys: ['portcullis-test-oidc-cookies'] },
  features: { devInteractions: { enabled: true } },
});
provider.proxy = false;
provider.listen(port, '127.0.0.1', () => console.log('ready'));
