"""API: the HTTP API v1 (aiohttp) in its own process: routes, tokens and tenants, problem
details, and the OpenAPI document built from the routes."""
