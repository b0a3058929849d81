"""SIGTERM as Ctrl-C for the whole command: raised as Terminated (exit 143), handler restored."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from normkd.signals import Terminated, sigterm_as_interrupt


def test_sigterm_inside_raises_terminated_and_the_old_handler_comes_back():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated) as caught, sigterm_as_interrupt():
        os.kill(os.getpid(), signal.SIGTERM)  # handled at the next bytecode, here
    assert caught.value.exit_code == 143 and isinstance(caught.value, KeyboardInterrupt)
    assert signal.getsignal(signal.SIGTERM) is before


def test_the_cli_exits_143_with_one_line_on_sigterm_outside_a_run(tmp_path):
    """A SIGTERM that lands outside a training run (after it finished, between the runs of a
    `normkd reproduce`) still gets one line and 143, not Python's silent default death."""
    code = textwrap.dedent(
        """
        import os, signal, sys
        import normkd.cli as cli
        def late(_args):  # as after run_recipe returned and restored its own handler
            os.kill(os.getpid(), signal.SIGTERM)
            return 0
        cli._cmd_recipes = late  # the parser is built at main(): it takes this one
        sys.exit(cli.main(["recipes"]))
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 143, proc.stderr
    assert proc.stderr.strip() == "normkd: interrupted"


def test_a_finished_command_keeps_its_exit_code_through_teardown():
    """After the command's work (normkd's process entry), a SIGTERM during interpreter teardown
    no longer kills it as -15: the finished command exits with its own code."""
    code = textwrap.dedent(
        """
        import os, signal, sys, time
        import normkd.cli as cli
        cli._cmd_recipes = lambda _args: 0
        sys.argv = ["normkd", "recipes"]
        rc = cli.entry()
        os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler's, while torch tears down
        os.kill(os.getpid(), signal.SIGINT)  # a late Ctrl-C
        time.sleep(0.2)
        sys.exit(rc)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, (proc.returncode, proc.stderr)
