"""`trillm serve`: an OpenAI-compatible HTTP server with continuous batching and a chat page (app.py: the
API; scheduler.py: the batching; page.html: the page)."""
