"""OpenAI wire models: pydantic only, importable without torch or vLLM."""
