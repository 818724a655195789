"""The controller. Any of its modules may import grpc, so its gRPC runtime is chosen here,
before the first of them (controller/grpc_runtime.py)."""

from controller.grpc_runtime import import_grpc_with_classic_io

import_grpc_with_classic_io()
