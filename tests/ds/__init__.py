"""Tests of the delivery service (DS): ordering rules, stores, gRPC API, HTTP side, CLI."""
