"""Quotas: rate limits (requests and tokens per sliding window), concurrency, budgets, usage records."""
