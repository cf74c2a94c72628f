"""The gateway's HTTP surface (Starlette on hypercorn's trio worker)."""
