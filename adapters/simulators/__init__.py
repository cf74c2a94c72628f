"""Provider simulators: real HTTP servers speaking each provider's API, with signed receipts."""
