"""Run the CLI in-process like a user would, capturing exit code and output."""

import pytest

from curvlab.cli import main


def run_cli(capsys, *args):
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def assert_clean_error(capsys, *args, match: str):
    code, out, err = run_cli(capsys, *args)
    assert code != 0, out
    assert "Traceback" not in err and "Traceback" not in out
    lines = [ln for ln in err.strip().splitlines() if ln]
    assert len(lines) == 1 or lines[-1].startswith("Error:"), err
    assert match in err, err
    return err
