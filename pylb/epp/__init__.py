"""`pylb epp`: pylb as Envoy's external processor, the endpoint picker (EPP) of the Gateway API
Inference Extension. Envoy forwards the bytes; pylb's router names the replica.

    processor.py   the ext_proc `Process` stream of one HTTP request: parse, route, answer Envoy,
                   observe the response for the router's accounting
    server.py      the gRPC server (ext_proc + gRPC health) and the /metrics listener around one
                   `pylb.proxy.balancer.Balancer`, the same wiring `pylb serve` runs
    epp_cli.py     the `pylb epp` subcommand

It needs the optional extra `epp` (grpcio, grpcio-health-checking, xds-protos).
"""
