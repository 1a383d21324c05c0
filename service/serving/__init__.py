"""Request -> engine mapping, chat rendering and SSE encoding."""
