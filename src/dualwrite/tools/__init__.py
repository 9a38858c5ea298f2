"""Tooling around the product, imported only by the CLI commands that use it.

`bench` and `bench_raw` measure (`dualwrite bench`), `chaos` breaks things on purpose
(`dualwrite chaos`), `proxy` is the TCP proxy that cuts connections for it, and
`serve_process` runs a `dualwrite serve` child process. They need the `tools` extra.
"""
