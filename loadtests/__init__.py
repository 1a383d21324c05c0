"""Load generator and reports against any OpenAI-compatible endpoint (see the load-test issue)."""
