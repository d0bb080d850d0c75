"""The server process around the app: the command line and its checks before any model loads,
worker processes and their sockets, the HTTP/1.1 layer's limits, memory returned after a
reload, and the loopback launcher that tests and benchmarks use."""
