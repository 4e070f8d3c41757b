"""The APIs clients speak besides chat completions (OpenAI's Responses, Anthropic's Messages), each read into a
chat completions request on the way in and made from the chat answer on the way out (the exchange's surface)."""
