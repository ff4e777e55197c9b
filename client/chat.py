"""`nsam chat`: a terminal chat that streams tokens as they come and manages memory.

    nsam chat --user alice                  new session for alice
    nsam chat --user alice --session ID     resume a session

In the chat: /memory  /forget  /export FILE  /rollback N  /consolidate  /session  /quit
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import TextIO

from nsam.client.client import Client
from nsam.client.types import NsamError, Sampling, Token, TurnResult

HELP = """commands:
  /memory          your memory levels, the kept versions of the user level and what it was taught
  /forget          delete everything the service keeps about you (asks first)
  /read FILE       read a text file into this session's memory (no reply; not in the transcript)
  /export FILE     save your user level (safetensors) to FILE
  /rollback N      make kept version N of your user level current again
  /consolidate     fold your sessions into your user level now (admin / open mode)
  /session         this session's id and version
  /quit            leave (the session is ended and consolidated)"""


def _time(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


class ChatLoop:
    """Reads lines from `stdin`, runs turns and commands, writes to `out`."""

    def __init__(self, client: Client, user: str, session_id: str | None, sampling: Sampling,
                 out: TextIO = sys.stdout, system_prompt: str = ""):
        self.client, self.user, self.sampling, self.out = client, user, sampling, out
        self.stdin: TextIO = sys.stdin
        self.system_prompt = system_prompt
        if session_id:
            s = client.get_session(session_id)
            self.print(f"resumed session {s.session_id} ({s.turns} turns, version {s.version})")
        else:
            s = client.create_session(user, system_prompt)
            self.print(f"new session {s.session_id} (user memory version {s.user_memory_version})")
        self.session = s

    def print(self, text: str = "", end: str = "\n") -> None:
        self.out.write(text + end)
        self.out.flush()

    def run(self, stdin: TextIO = sys.stdin, prompt: bool = True) -> int:
        self.stdin = stdin
        self.print("type a message, /help for commands")
        while True:
            if prompt:
                self.print("> ", end="")
            line = stdin.readline()
            if not line:
                break
            line = line.strip()
            if not line:
                continue
            try:
                if line.startswith("/"):
                    if not self.command(line):
                        break
                else:
                    self.turn(line)
            except NsamError as err:
                self.print(f"[{err.code.name}] {err.message}")
        self.quit()
        return 0

    def turn(self, message: str) -> None:
        for item in self.client.chat(self.session.session_id, message, self.sampling):
            if isinstance(item, Token):
                self.print(item.text, end="")
            elif isinstance(item, TurnResult):
                self.print()
                self.print(f"  [{item.finish_reason}, {item.completion_tokens} tokens, session "
                           f"v{item.session_version}{', learned' if item.learned else ''}]")

    def command(self, line: str) -> bool:
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        if name in ("/quit", "/exit"):
            return False
        if name == "/help":
            self.print(HELP)
        elif name == "/memory":
            info = self.client.memory(self.user)
            self.print(f"user {info.user}: user level version {info.version} "
                       f"(model {info.model_fingerprint})")
            for v in info.versions:
                self.print(f"  v{v.version}  {v.source:13s} {v.state_bytes:>10d} B  {_time(v.created_unix_ms)}")
            if info.facts:
                self.print("  taught: " + " ".join(f.answer for f in info.facts))
            for level in info.levels:
                if level.name == "session":
                    mark = " (this one)" if level.owner == self.session.session_id else ""
                    self.print(f"  session {level.owner} v{level.version} {level.state_bytes} B{mark}")
        elif name == "/forget":
            self.print(f"delete ALL memory and sessions of {self.user}? type yes: ", end="")
            if arg == "--yes" or self.stdin.readline().strip().lower() == "yes":
                n = self.client.forget(self.user)
                self.print(f"forgot {self.user} ({n} keys deleted); starting a new session")
                self.session = self.client.create_session(self.user, self.system_prompt)
        elif name == "/read":
            if not arg:
                self.print("usage: /read FILE   (a UTF-8 text file)")
            else:
                try:
                    text = Path(arg).read_text(encoding="utf-8")
                except (OSError, UnicodeDecodeError) as exc:
                    self.print(f"cannot read {arg}: {exc}")
                    return True
                r = self.client.read_document(self.session.session_id, text)
                self.print(f"  [read {r.tokens} tokens in {r.chunks} chunks, perplexity {r.perplexity:.2f} "
                           f"as read, session v{r.session_version}"
                           f"{f', {r.rejected_updates} updates rejected' if r.rejected_updates else ''}]")
        elif name == "/export":
            if not arg:
                self.print("usage: /export FILE")
            else:
                exported = self.client.export_memory(self.user)
                Path(arg).write_bytes(exported.state)
                self.print(f"wrote user level v{exported.version} ({len(exported.state)} B) to {arg}")
        elif name == "/rollback":
            if not arg.isdigit():
                self.print("usage: /rollback N   (see /memory for the kept versions)")
            else:
                v = self.client.rollback(int(arg), self.user)
                self.print(f"user level is now v{v.version} (the bytes of v{arg}); new sessions start from it")
        elif name == "/consolidate":
            for r in self.client.consolidate_now(self.user):
                self.print(f"  {r.session_id}: {r.outcome} ({r.reason}) probe {r.probe_loss:.3f} "
                           f"vs {r.baseline_probe_loss:.3f} -> user v{r.user_memory_version}")
        elif name == "/session":
            s = self.client.get_session(self.session.session_id)
            self.print(f"session {s.session_id}: {s.turns} turns, version {s.version}")
        else:
            self.print(f"unknown command {name}; /help lists them")
        return True

    def quit(self) -> None:
        try:
            _, enqueued = self.client.end_session(self.session.session_id)
            self.print(f"session ended{'; consolidation queued' if enqueued else ''} "
                       f"(Ctrl-C instead leaves it open to resume with --session)")
        except NsamError as err:
            self.print(f"[{err.code.name}] {err.message}")


def sampling_from_args(args: argparse.Namespace) -> Sampling:
    """The sampling flags given; the rest are left to the server's defaults."""
    return Sampling(max_tokens=args.max_tokens, temperature=args.temperature, top_p=getattr(args, "top_p", None),
                    repetition_penalty=args.repetition_penalty)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="nsam chat", description=__doc__.splitlines()[0])
    p.add_argument("--target", default=os.environ.get("NSAM_TARGET", "127.0.0.1:50051"))
    p.add_argument("--user", default="", help="your user id (may be omitted with a user key)")
    p.add_argument("--session", default=None, help="resume this session id")
    p.add_argument("--api-key", default=os.environ.get("NSAM_API_KEY"), help="[env NSAM_API_KEY]")
    p.add_argument("--tls", action="store_true", help="use TLS (system roots or --root-cert)")
    p.add_argument("--root-cert", default=None, help="PEM root certificate for TLS")
    p.add_argument("--system", default="", help="system prompt of a new session")
    p.add_argument("--max-tokens", type=int, default=None)
    # A conversation is sampled: greedy decoding of a small model repeats an earlier answer to
    # every later question. 0 gives greedy replies.
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--repetition-penalty", type=float, default=1.1,
                   help="above 1, tokens already in the conversation are less likely: "
                        "keeps a small model's replies from looping")
    args = p.parse_args(argv)
    sampling = sampling_from_args(args)
    with Client(args.target, api_key=args.api_key, tls=args.tls, root_cert=args.root_cert) as client:
        try:
            loop = ChatLoop(client, args.user, args.session, sampling, system_prompt=args.system)
        except NsamError as err:
            print(f"[{err.code.name}] {err.message}", file=sys.stderr)
            return 1
        try:
            return loop.run(prompt=sys.stdin.isatty())
        except KeyboardInterrupt:
            print(f"\nleft session {loop.session.session_id} open; resume with --session")
            return 0


if __name__ == "__main__":
    sys.exit(main())
