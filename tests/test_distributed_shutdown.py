"""The CLI leaves a torchrun process group at a normal exit (gloo's threads otherwise can abort
the finished process in the interpreter's teardown: SIGABRT, 'terminate called without an
active exception', seen once in CI on a two-process run)."""

import subprocess
import sys
import textwrap

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")


def _run(body: str) -> subprocess.CompletedProcess:
    script = textwrap.dedent("""
        import os, socket, sys
        import torch
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1")
        torch.distributed.init_process_group("gloo")
    """) + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)


def test_shutdown_distributed_leaves_the_group_and_is_idempotent():
    r = _run("""
        from adapterkit.engine.distributed import shutdown_distributed
        assert torch.distributed.is_initialized()
        shutdown_distributed()
        assert not torch.distributed.is_initialized()
        shutdown_distributed()  # nothing to leave: no error
        print("ok")
    """)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_cli_main_leaves_the_group_after_success_only():
    r = _run("""
        from unittest import mock
        import adapterkit.cli as cli
        ok = mock.Mock(return_value=0)
        with mock.patch.object(cli, "build_parser") as bp:
            bp.return_value.parse_args.return_value = mock.Mock(version=False, _run=ok, command="x")
            assert cli.main([]) == 0
        print("after success", torch.distributed.is_initialized())
        torch.distributed.init_process_group("gloo")
        fail = mock.Mock(return_value=3)
        with mock.patch.object(cli, "build_parser") as bp:
            bp.return_value.parse_args.return_value = mock.Mock(version=False, _run=fail, command="x")
            assert cli.main([]) == 3
        print("after failure", torch.distributed.is_initialized())
        torch.distributed.destroy_process_group()
    """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[:2] == ["after success False", "after failure True"], r.stdout


def _entry_with(code: int, group: bool) -> subprocess.CompletedProcess:
    return _run(f"""
        import atexit
        from unittest import mock
        import adapterkit.cli as cli
        if not {group}:
            torch.distributed.destroy_process_group()
        atexit.register(lambda: print("interpreter teardown ran", flush=True))
        run = mock.Mock(side_effect=lambda a: print("the run's output") or {code})
        with mock.patch.object(cli, "build_parser") as bp:
            bp.return_value.parse_args.return_value = mock.Mock(version=False, _run=run, command="x")
            cli.entry()
    """)


def test_entry_of_a_finished_rank_skips_the_interpreter_teardown():
    # a rank that left its group ends through os._exit: its output is flushed, the code kept, and
    # the C++ teardown where gloo's threads abort (SIGABRT) never runs (nor do atexit handlers)
    r = _entry_with(0, group=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["the run's output"], r.stdout


def test_entry_without_a_group_or_after_failure_exits_normally():
    r = _entry_with(0, group=False)
    assert r.returncode == 0 and r.stdout.splitlines() == ["the run's output", "interpreter teardown ran"], r
    r = _entry_with(3, group=True)  # a failed run keeps its group (no teardown of a group another rank waits on)
    assert r.returncode == 3 and "interpreter teardown ran" in r.stdout, r
