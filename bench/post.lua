-- wrk script: a small non-streaming chat completion, the same body for every case.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
-- LiteLLM requires its master key; the other targets ignore the header.
wrk.headers["Authorization"] = "Bearer sk-portcullis-bench-0123456789abcdef"
wrk.body = '{"model":"bench","messages":[{"role":"system","content":"You are terse."},{"role":"user","content":"Say hello in five words."}],"max_tokens":16,"temperature":0}'
