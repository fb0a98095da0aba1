"""What .ci/run guarantees before it calls the README's test command."""

from __future__ import annotations

import subprocess

from tests.helpers import REPO


def test_ci_run_sets_ci_itself_before_the_tests(tmp_path):
    """Run by hand without CI=true, .ci/run must still make missing data or SLURM fail, not skip: run its lines
    up to the test command with `make` and the cluster script replaced by stand-ins that print CI."""
    script = (REPO / ".ci" / "run").read_text()
    stand_ins = script.replace("bash tests/slurm/cluster.sh up", "true").replace(
        "trap 'bash tests/slurm/cluster.sh down' EXIT", "").replace("\nmake test-all\n", '\necho "CI=${CI:-unset}"\n')
    assert stand_ins.count('echo "CI=') == 1  # the test command (its own line) was found and replaced
    (tmp_path / "run").write_text(stand_ins)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}  # no CI in the environment
    result = subprocess.run(["bash", str(tmp_path / "run")], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "CI=true"
