"""pytest configuration of the benchmarks: what goes into ``--benchmark-json`` besides the timings -- the machine's
description under ``machine_info["msd_fast"]`` and the references that did not compile under ``"msd_fast"``."""
from bench.common import COMPILE_FAILURES, machine_description


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["msd_fast"] = machine_description()


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["msd_fast"] = {"compile_failures": list(COMPILE_FAILURES)}
