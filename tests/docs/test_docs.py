#!/usr/bin/env python3
"""Runs the commands of the documentation (README.md and docs/**/*.md), run by
scripts/test-docs.sh.

Every fenced shell block (```sh, ```bash, ```shell, ```console) is either run here or
carries a marker saying why not, in an HTML comment on the line(s) directly above it:

  <!-- not-runnable: REASON -->        never run here; REASON says why (a cluster, a real
                                       server's NICs, systemd as PID 1, ...)
  <!-- exercised-by: FILE -->          needs real servers or running agents, and is run for
                                       real by FILE (a test or the demo); accepted only when
                                       every command of the block is listed for FILE in
                                       EXERCISED below and FILE really contains it
  <!-- doctest: background port=N -->  started in the background (a daemon); the next block
                                       runs once 127.0.0.1:N accepts connections
  <!-- doctest: exit=N -->             must exit with status N (errors the docs show)
  <!-- doctest: timeout=S -->          may take up to S seconds (default 60)

Other blocks take part too:

  <!-- file: PATH -->                  before a ```yaml (or any non-shell) block: the block is
                                       written to PATH before the following shell blocks run
  <!-- output -->                      before a ```text block right after a shell block: what
                                       that command prints. Each non-blank line must appear,
                                       in order, among the lines printed (runs of blanks are
                                       compared as one blank); `…` matches anything (a
                                       line of just `…` stands for more lines), and
                                       `{{NAME}}` matches one word and exports it as $NAME to
                                       later blocks (a value the reader copies from output)

A file may continue the session of another one with a line `<!-- doctest: continues
docs/install.md -->`: that file's steps run first, in the same sandbox.

Each session runs in its own sandbox: new mount, network and PID namespaces (so every
process it started dies with it and every mount disappears), copy-on-write overlays over
/etc, /usr, /var, /root, /run, /opt, /home and the checkout (nothing written reaches the
real files), a fresh /tmp, and a network namespace holding only loopback with 127.0.0.1 and
198.18.0.10 (`ctl.example` in /etc/hosts). The freshly built debug binaries are on PATH
(/usr/local/bin) and stand in for target/release/. Commands run from the checkout's root
with `set -euo pipefail`; exported variables and the working directory carry over from one
block to the next.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import unittest
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
BINARIES = ("hapair-operator", "hapair-agent", "kubectl-hapair")
SHELL_LANGUAGES = {"sh", "bash", "shell", "console"}
CONTROLLER_ADDRESS = "198.18.0.10"
HOSTS = ("ctl.example",)
DEFAULT_TIMEOUT = 60
SESSION_TIMEOUT = 300

# Commands that need real servers (two agents, a failover) and are run for real elsewhere:
# the command prefix, the file that runs it, and a string that file must contain.
EXERCISED = {
    "hapair-agent run": ("tests/tests/e2e.rs", "agent.yaml"),
    "bash scripts/demo.sh": ("scripts/test.sh", "scripts/demo.sh"),
    "hapair switchover": ("tests/tests/e2e.rs", '"switchover"'),
    "hapair maintenance": ("tests/tests/admin_e2e.rs", '"maintenance"'),
    "hapair force-active": ("tests/tests/admin_e2e.rs", '"force-active"'),
    "hapair resolve-split-brain": ("tests/tests/admin_e2e.rs", '"resolve-split-brain"'),
}

FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")
COMMENT = re.compile(r"^\s*<!--\s*(?P<body>.*?)\s*-->\s*$")
CONTINUES = re.compile(r"^\s*<!--\s*doctest:\s*continues\s+(?P<file>\S+)\s*-->\s*$")


class DocError(Exception):
    """A documentation block that breaks the rules above."""


@dataclasses.dataclass
class Block:
    file: Path
    line: int
    language: str
    text: str
    markers: list[str]

    @property
    def where(self) -> str:
        return f"{self.file.relative_to(REPO)}:{self.line}"

    @property
    def is_shell(self) -> bool:
        return self.language in SHELL_LANGUAGES


def parse_blocks(path: Path) -> list[Block]:
    """Every fenced block of a Markdown file, with the comment markers right above it."""
    lines = path.read_text().splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, indent = m.group("fence"), len(m.group("indent"))
        info = m.group("info").strip()
        start = i
        body: list[str] = []
        i += 1
        while i < len(lines):
            close = re.match(r"^ {0,3}(`{3,}|~{3,})\s*$", lines[i])
            if close and close.group(1)[0] == fence[0] and len(close.group(1)) >= len(fence):
                break
            body.append(lines[i][indent:] if lines[i][:indent].isspace() else lines[i])
            i += 1
        else:
            raise DocError(f"{path.relative_to(REPO)}:{start + 1}: code block is never closed")
        markers: list[str] = []
        j = start - 1
        while j >= 0 and (c := COMMENT.match(lines[j])):
            markers.insert(0, c.group("body"))
            j -= 1
        language = info.split()[0] if info else ""
        blocks.append(Block(path, start + 1, language, "\n".join(body) + "\n", markers))
        i += 1
    return blocks


def commands_of(text: str) -> list[str]:
    """The commands of a shell block: continuation lines joined, comments and blanks dropped."""
    joined = re.sub(r"\s*\\\n\s*", " ", text)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            out.append(line)
    return out


@dataclasses.dataclass
class Step:
    """One thing a session does: write a file, or run a shell block."""

    kind: str  # "file" | "run" | "background"
    where: str
    text: str
    path: str = ""
    exit: int = 0
    timeout: int = DEFAULT_TIMEOUT
    port: int = 0
    expect: list[str] = dataclasses.field(default_factory=list)
    expect_where: str = ""


@dataclasses.dataclass
class Plan:
    steps: list[Step]
    skipped: list[tuple[str, str]]  # (where, reason)
    pending: list[tuple[str, str]]  # (where, command)


def plan_file(path: Path) -> Plan:
    """Classifies the blocks of one file and turns the runnable ones into steps."""
    blocks = parse_blocks(path)
    steps: list[Step] = []
    skipped: list[tuple[str, str]] = []
    pending: list[tuple[str, str]] = []
    previous_shell: Step | None = None
    previous_was_shell = False
    for block in blocks:
        if not block.language:
            raise DocError(f"{block.where}: code block without a language; say what it is "
                           f"(sh for commands, text for output, yaml, ...)")
        not_runnable = runs_in = output = None
        file_target = None
        options: dict[str, str] = {}
        for marker in block.markers:
            key, _, value = marker.partition(":")
            key, value = key.strip(), value.strip()
            if key == "not-runnable":
                if len(value) < 10:
                    raise DocError(f"{block.where}: not-runnable needs a reason")
                not_runnable = value
            elif key == "exercised-by":
                if value not in {file for file, _ in EXERCISED.values()}:
                    raise DocError(f"{block.where}: exercised-by names {value!r}, which runs none of EXERCISED")
                runs_in = value
            elif key == "file":
                if not value.startswith("/"):
                    raise DocError(f"{block.where}: file: needs an absolute path")
                file_target = value
            elif key == "output" and not value:
                output = True
            elif key == "doctest":
                for word in value.split():
                    name, eq, arg = word.partition("=")
                    if name == "background" and not eq:
                        options["background"] = "1"
                    elif name in ("port", "exit", "timeout") and arg.isdigit():
                        options[name] = arg
                    else:
                        raise DocError(f"{block.where}: unknown doctest option {word!r}")
            else:
                raise DocError(f"{block.where}: unknown marker <!-- {marker} --> above a code block")
        if block.is_shell:
            if output or file_target:
                raise DocError(f"{block.where}: output/file markers belong on non-shell blocks")
            if (not_runnable and runs_in) or (options and (not_runnable or runs_in)):
                raise DocError(f"{block.where}: a block is either run, not-runnable or exercised-by, not several")
            if not_runnable:
                skipped.append((block.where, not_runnable))
                previous_was_shell, previous_shell = True, None
                continue
            if runs_in:
                for command in commands_of(block.text):
                    where = [e for p, e in EXERCISED.items() if command == p or command.startswith(p + " ")]
                    if not where or where[0][0] != runs_in:
                        raise DocError(f"{block.where}: `{command}` is not run by {runs_in} (see EXERCISED); "
                                       f"run it here, or mark the block not-runnable with a reason")
                    file, needle = where[0]
                    if needle not in (REPO / file).read_text():
                        raise DocError(f"{block.where}: {file} no longer contains {needle!r}; "
                                       f"`{command}` is not exercised there any more")
                    pending.append((block.where, command))
                previous_was_shell, previous_shell = True, None
                continue
            if not commands_of(block.text):
                raise DocError(f"{block.where}: shell block without commands")
            background = "background" in options
            if background and "port" not in options:
                raise DocError(f"{block.where}: doctest background needs port=N")
            step = Step(
                kind="background" if background else "run",
                where=block.where,
                text=block.text,
                exit=int(options.get("exit", "0")),
                timeout=int(options.get("timeout", str(DEFAULT_TIMEOUT))),
                port=int(options.get("port", "0")),
            )
            steps.append(step)
            previous_shell, previous_was_shell = step, True
            continue
        if any(k in options for k in ("background", "exit", "timeout", "port")) or not_runnable or runs_in:
            raise DocError(f"{block.where}: run markers belong on shell blocks")
        if output:
            if not previous_was_shell:
                raise DocError(f"{block.where}: an output block must follow a shell block")
            if previous_shell is not None:
                previous_shell.expect = block.text.splitlines()
                previous_shell.expect_where = block.where
        elif file_target:
            steps.append(Step(kind="file", where=block.where, text=block.text, path=file_target))
        previous_was_shell, previous_shell = False, None
    return Plan(steps, skipped, pending)


def session_chain(path: Path, seen: tuple[Path, ...] = ()) -> list[Path]:
    """The files whose steps run before (and including) `path`'s."""
    if path in seen:
        raise DocError(f"{path.relative_to(REPO)}: doctest continues loops back to itself")
    for line in path.read_text().splitlines():
        m = CONTINUES.match(line)
        if m:
            parent = (REPO / m.group("file")).resolve()
            if not parent.is_file():
                raise DocError(f"{path.relative_to(REPO)}: continues {m.group('file')}, which does not exist")
            return [*session_chain(parent, (*seen, path)), path]
    return [path]


# ----------------------------------------------------------------------------------------
# Matching expected output


def expected_pattern(line: str) -> re.Pattern[str]:
    parts = re.split(r"(…|\{\{[A-Z][A-Z0-9_]*\}\})", " ".join(line.split()))
    regex = ""
    for part in parts:
        if part == "…":
            regex += ".*?"
        elif part.startswith("{{"):
            regex += f"(?P<{part[2:-2]}>\\S+)"
        else:
            regex += re.escape(part)
    return re.compile(regex)


def match_output(expected: list[str], actual: str) -> tuple[bool, dict[str, str], str]:
    """Each non-blank expected line, in order, among the actual lines (whitespace runs
    compared as one blank). Returns (ok, captures, the first line not found)."""
    lines = [" ".join(line.split()) for line in actual.splitlines()]
    captures: dict[str, str] = {}
    pos = 0
    for want in expected:
        if want.strip() in ("", "…"):
            continue
        pattern = expected_pattern(want)
        while pos < len(lines):
            m = pattern.fullmatch(lines[pos])
            pos += 1
            if m:
                captures.update({k: v for k, v in m.groupdict().items() if v is not None})
                break
        else:
            return False, captures, want
    return True, captures, ""


# ----------------------------------------------------------------------------------------
# The sandbox (runs as PID 1 of fresh namespaces: `--inner`)


def sh(*args: str) -> None:
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def mount_overlay(target: str, scratch: Path, name: str) -> None:
    upper, work = scratch / f"{name}-upper", scratch / f"{name}-work"
    upper.mkdir()
    work.mkdir()
    sh("mount", "-t", "overlay", "overlay", "-o", f"lowerdir={target},upperdir={upper},workdir={work}", target)


def setup_sandbox(scratch: Path) -> None:
    sh("mount", "-t", "tmpfs", "-o", "mode=0700", "tmpfs", str(scratch))
    for i, target in enumerate(("/etc", "/usr", "/var", "/root", "/run", "/opt", "/home", str(REPO))):
        if os.path.isdir(target):
            mount_overlay(target, scratch, f"o{i}")
    # A checkout below /tmp (a CI clone, say) would vanish under the fresh /tmp: park its
    # overlay in /run (overlaid above) and move it back into the new /tmp.
    under_tmp = Path("/tmp") in REPO.parents
    parked = Path("/run/hapair-doctest-checkout")
    if under_tmp:
        parked.mkdir(parents=True, exist_ok=True)
        sh("mount", "--move", str(REPO), str(parked))
    sh("mount", "-t", "tmpfs", "-o", "mode=1777", "tmpfs", "/tmp")
    if under_tmp:
        REPO.mkdir(parents=True, exist_ok=True)
        sh("mount", "--move", str(parked), str(REPO))
    sh("ip", "link", "set", "lo", "up")
    sh("ip", "addr", "add", f"{CONTROLLER_ADDRESS}/32", "dev", "lo")
    with open("/etc/hosts", "a") as hosts:
        hosts.write(f"{CONTROLLER_ADDRESS} {' '.join(HOSTS)}\n")
    debug = REPO / "target" / "debug"
    release = REPO / "target" / "release"
    release.mkdir(parents=True, exist_ok=True)
    for binary in BINARIES:
        for link in (Path("/usr/local/bin") / binary, release / binary):
            if link.exists() or link.is_symlink():
                link.unlink()
            link.symlink_to(debug / binary)
    Path("/run/doctest").mkdir(mode=0o700)


def block_script(step: Step, env_file: Path) -> str:
    save = (f"trap 'export -p > {env_file}.next; printf \"cd %q\\n\" \"$PWD\" >> {env_file}.next' EXIT\n"
            if step.kind == "run" else "")
    return f"source {env_file}\n{save}set -euo pipefail\n{step.text}"


def wait_port(port: int, process: subprocess.Popen[bytes], deadline: float) -> str:
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return f"exited with {process.returncode} before port {port} was open"
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return ""
        except OSError:
            time.sleep(0.05)
    return f"port {port} not open within the timeout"


def run_steps(steps: list[Step]) -> dict[str, object]:
    """Runs the steps in the sandbox; returns what happened, stopping at the first failure."""
    env_file = Path("/run/doctest/env.sh")
    env_file.write_text(f"cd {shlex.quote(str(REPO))}\n")
    base_env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root",
                "LANG": "C.UTF-8", "TERM": "dumb", "USER": "root"}
    background: list[subprocess.Popen[bytes]] = []
    done = 0
    failure = None
    for n, step in enumerate(steps):
        if step.kind == "file":
            target = Path(step.path)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(step.text)
            done += 1
            continue
        script = Path(f"/run/doctest/block{n}.sh")
        script.write_text(block_script(step, env_file))
        log = Path(f"/run/doctest/block{n}.log")
        started = time.monotonic()
        with open(log, "wb") as out:
            process = subprocess.Popen(["bash", "--noprofile", "--norc", str(script)], stdin=subprocess.DEVNULL,
                                       stdout=out, stderr=subprocess.STDOUT, env=base_env, start_new_session=True)
        if step.kind == "background":
            background.append(process)
            problem = wait_port(step.port, process, started + step.timeout)
            output = log.read_text(errors="replace")
            if not problem and step.expect:
                while True:
                    ok, _, missing = match_output(step.expect, output)
                    if ok or time.monotonic() > started + step.timeout:
                        break
                    time.sleep(0.1)
                    output = log.read_text(errors="replace")
                if not ok:
                    problem = f"its output lacks {missing!r} (expected in {step.expect_where})"
            if problem:
                failure = {"where": step.where, "problem": problem, "output": output}
                break
            done += 1
            continue
        try:
            code = process.wait(timeout=step.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            code = None
        output = log.read_text(errors="replace")
        elapsed = time.monotonic() - started
        if code is None:
            failure = {"where": step.where, "problem": f"still running after {step.timeout} s", "output": output}
            break
        if code != step.exit:
            failure = {"where": step.where, "problem": f"exited with {code}, expected {step.exit}", "output": output}
            break
        next_env = Path(f"{env_file}.next")
        if next_env.exists():
            next_env.replace(env_file)
        if step.expect:
            ok, captures, missing = match_output(step.expect, output)
            if not ok:
                failure = {"where": step.where,
                           "problem": f"output lacks {missing!r} (expected in {step.expect_where})",
                           "output": output}
                break
            with open(env_file, "a") as env:
                for name, value in captures.items():
                    env.write(f"export {name}={shlex.quote(value)}\n")
        done += 1
        if elapsed > 10:
            print(f"  slow: {step.where} took {elapsed:.1f} s", file=sys.stderr)
    for process in background:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + 5
    for process in background:
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
    return {"done": done, "failure": failure}


def inner(plan_path: str) -> int:
    plan = json.loads(Path(plan_path).read_text())
    results = Path(plan_path).with_suffix(".result.json")
    # The scratch directory and the result file live below /tmp, which the sandbox hides:
    # keep a handle on the result file from before.
    result_fd = os.open(results, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    scratch = Path(plan_path).parent / "sandbox"
    scratch.mkdir()
    try:
        setup_sandbox(scratch)
        result = run_steps([Step(**s) for s in plan["steps"]])
    except (OSError, subprocess.CalledProcessError) as e:
        detail = e.stderr.decode(errors="replace") if isinstance(e, subprocess.CalledProcessError) else ""
        result = {"done": 0, "failure": {"where": "sandbox setup", "problem": f"{e} {detail}", "output": ""}}
    os.write(result_fd, json.dumps(result).encode())
    os.close(result_fd)
    return 0


# ----------------------------------------------------------------------------------------
# The tests


def run_session(chain: list[Path]) -> dict[str, object]:
    started = time.monotonic()
    result = run_session_steps(chain)
    result["seconds"] = time.monotonic() - started
    return result


def run_session_steps(chain: list[Path]) -> dict[str, object]:
    steps: list[Step] = []
    for path in chain:
        steps.extend(plan_file(path).steps)
    with tempfile.TemporaryDirectory(prefix="hapair-doctest-") as tmp:
        plan_path = Path(tmp) / "plan.json"
        plan_path.write_text(json.dumps({"steps": [dataclasses.asdict(s) for s in steps]}))
        command = ["unshare", "--mount", "--net", "--pid", "--fork", "--mount-proc", "--kill-child",
                   sys.executable, str(Path(__file__).resolve()), "--inner", str(plan_path)]
        try:
            proc = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, timeout=SESSION_TIMEOUT)
        except subprocess.TimeoutExpired:
            return {"done": 0, "failure": {"where": str(chain[-1]), "problem": "session timed out", "output": ""},
                    "steps": len(steps)}
        result_path = plan_path.with_suffix(".result.json")
        if proc.returncode != 0 or not result_path.exists():
            return {"done": 0, "steps": len(steps), "failure": {
                "where": "sandbox", "problem": f"unshare exited with {proc.returncode}",
                "output": (proc.stdout + proc.stderr).decode(errors="replace")}}
        result = json.loads(result_path.read_text())
        if proc.stderr:
            sys.stderr.write(proc.stderr.decode(errors="replace"))
        result["steps"] = len(steps)
        return result


class Extraction(unittest.TestCase):
    """The rules about blocks, applied to every documentation file."""

    def test_every_shell_block_is_run_or_marked(self) -> None:
        problems = []
        pending = []
        for path in DOCS:
            try:
                plan = plan_file(path)
                session_chain(path)
            except DocError as e:
                problems.append(str(e))
                continue
            pending.extend(plan.pending)
        if problems:
            self.fail("\n".join(problems))
        if pending:
            print(f"\n  exercised by tests elsewhere (exercised-by): {len(pending)} commands", file=sys.stderr)
            for where, command in pending:
                print(f"    {where}: {command}", file=sys.stderr)

    def test_rules_catch_bad_blocks(self) -> None:
        with tempfile.TemporaryDirectory(dir=REPO / "target") as tmp:
            cases = {
                "```\nls\n```\n": "without a language",
                "<!-- not-runnable: x -->\n```sh\nls\n```\n": "needs a reason",
                "<!-- exercised-by: tests/tests/e2e.rs -->\n```sh\nrm -rf /\n```\n": "is not run by",
                "<!-- exercised-by: tests/tests/admin_e2e.rs -->\n```sh\nhapair switchover pg --to b\n```\n":
                    "is not run by",
                "<!-- exercised-by: nowhere.rs -->\n```sh\nhapair switchover pg --to b\n```\n": "runs none of",
                "<!-- not-runable: typo in the marker -->\n```sh\nls\n```\n": "unknown marker",
                "<!-- doctest: background -->\n```sh\nsleep 1\n```\n": "needs port=N",
                "Text\n\n<!-- output -->\n```text\nhi\n```\n": "must follow a shell block",
                "```sh\nls\n": "never closed",
            }
            for text, needle in cases.items():
                path = Path(tmp) / "bad.md"
                path.write_text(text)
                with self.assertRaises(DocError, msg=text) as caught:
                    plan_file(path)
                self.assertIn(needle, str(caught.exception), text)
            path = Path(tmp) / "good.md"
            path.write_text("<!-- exercised-by: tests/tests/e2e.rs -->\n```sh\nhapair-agent run --config /etc/hapair/agent.yaml\n"
                            "hapair switchover pg \\\n  --to db2\n```\n\n```sh\necho hi\n```\n<!-- output -->\n```text\nhi\n```\n")
            plan = plan_file(path)
            self.assertEqual([c for _, c in plan.pending],
                             ["hapair-agent run --config /etc/hapair/agent.yaml", "hapair switchover pg --to db2"])
            self.assertEqual([(s.kind, s.expect) for s in plan.steps], [("run", ["hi"])])

    def test_output_matching(self) -> None:
        actual = "token:          hpe_abc\nnode:  db1\n\nexpires: 2026-01-01\n"
        ok, captures, _ = match_output(["token: {{TOKEN}}", "…", "expires: …"], actual)
        self.assertTrue(ok)
        self.assertEqual(captures, {"TOKEN": "hpe_abc"})
        ok, _, missing = match_output(["node: db1", "token: …"], actual)
        self.assertFalse(ok)
        self.assertEqual(missing, "token: …")


class Sessions(unittest.TestCase):
    """Runs the runnable blocks, one sandboxed session per file (after the files it continues).

    A session that is the beginning of a longer one is not run on its own: the longer one
    runs its steps too, in the same order. Sessions run side by side (each has its own
    namespaces), since most of their time is spent waiting for the controller."""

    def test_documented_commands_run(self) -> None:
        chains = []
        for path in DOCS:
            if any(s.kind != "file" for s in plan_file(path).steps):
                chains.append(session_chain(path))
        longest = [c for c in chains if not any(len(o) > len(c) and o[:len(c)] == c for o in chains)]
        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
            results = list(pool.map(run_session, longest))
        failures = []
        covered = 0
        for chain, result in zip(longest, results):
            label = " -> ".join(str(p.relative_to(REPO)) for p in chain)
            status = "FAILED" if result["failure"] else "ok"
            print(f"\n  {label}: {result['done']}/{result['steps']} steps, {result['seconds']:.1f} s, {status}",
                  file=sys.stderr, end="")
            if result["failure"]:
                f = result["failure"]
                failures.append(f"{f['where']}: {f['problem']}\n--- output ---\n{f['output']}--- end ---")
        for chain in chains:
            covered += len(plan_file(chain[-1]).steps)
        print(f"\n  {covered} steps of {len(chains)} files in {len(longest)} sessions, "
              f"{time.monotonic() - started:.1f} s", file=sys.stderr)
        if failures:
            self.fail("\n\n".join(failures))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--inner":
        sys.exit(inner(sys.argv[2]))
    if os.geteuid() != 0:
        sys.exit("test_docs.py: run as root (the sandbox needs mount and network namespaces)")
    for binary in BINARIES:
        if not os.access(REPO / "target" / "debug" / binary, os.X_OK):
            sys.exit(f"test_docs.py: target/debug/{binary} missing; build it first (cargo build)")
    if shutil.which("unshare") is None:
        sys.exit("test_docs.py: unshare (util-linux) is required")
    unittest.main(verbosity=2)
