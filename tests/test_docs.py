"""What the README promises a newcomer on a fresh machine, checked."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_readme_commands_need_no_sudo_and_say_root_is_needed() -> None:
    readme = (ROOT / "README.md").read_text()
    first = re.search(r"```sh\n(.*?)```", readme, re.S)
    assert first, "the README opens with its commands"
    commands = [line.split("#")[0].strip() for line in first[1].splitlines()]
    assert commands == ["scripts/demo", "scripts/test"], commands
    assert "as root" in readme[:1500]


def test_setup_refuses_a_user_who_is_not_root_in_one_line() -> None:
    proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                           str(ROOT / "scripts" / "setup")], capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "scripts/setup: run it as root: it installs Debian packages (and the tests start QEMU "
        "with KVM and mount FUSE)"]
