"""National register ingestion: DIRBS-style full and delta lists into the Redis store.

Entry points: `command.add_sync_parser` / `command.run_sync` (the `eir-server sync` CLI) and
`engine.run_once` for programmatic use. File formats live in `eir_server.store.register`, shared
with the embedded store. See docs/sync.md.
"""
