"""The web console: server-rendered pages with htmx, served beside the API."""
