-- wrk script: a small non-streaming chat completion, the same body for every case.
-- BENCH_KEY is set per target by bench/run.py (the gateway's key, LiteLLM's master key, or none).
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local key = os.getenv("BENCH_KEY")
if key ~= nil and key ~= "" then
  wrk.headers["Authorization"] = "Bearer " .. key
end
-- BENCH_STREAM=1 asks for a streamed answer (bench/stack.py's streamed cases).
local stream = ""
if os.getenv("BENCH_STREAM") == "1" then
  stream = ',"stream":true'
end
wrk.body = '{"model":"bench","messages":[{"role":"system","content":"You are terse."},{"role":"user","content":"Say hello in five words."}],"max_tokens":16,"temperature":0' .. stream .. '}'
