"""The gateway's HTTP surface: ops and the admin API on Starlette + hypercorn, the public
webhooks and tracking links on the lean server (``gateway.httpserver``)."""
