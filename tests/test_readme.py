"""The README's promises: its quick start runs as written, and CI runs its test command."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def code_blocks(language):
  return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_quick_start_runs_as_written(capsys):
  (quick_start,) = code_blocks("python")
  exec(compile(quick_start, "README.md", "exec"), {})  # pylint: disable=exec-used
  printed = capsys.readouterr().out.split()
  assert float(printed[0]) == 4.25 and int(printed[1]) == 8 * 2**20
  assert 0.05 < float(printed[2]) < 0.12


def test_exactly_two_setup_commands_and_ci_runs_the_test_one():
  setup, test = code_blocks("bash")
  assert "examples/formats_table.py" in setup or "jaxquant report" in setup
  test_command = test.strip().split("&& ", 2)[2]  # after creating and activating the venv
  assert test_command in (ROOT / ".ci" / "run").read_text()
