"""A real headless ComfyUI server with the pack, for end-to-end tests through the API queue.

    with ComfyServer(tmp_path) as server:
        result = server.run(api_graph)      # POST /prompt, follow /ws, read /history
        ids = [server.queue(g) for g in graphs]; results = [server.wait(i) for i in ids]  # a busy queue

The server runs as `main.py --cpu --use-pytorch-cross-attention` on a free loopback port,
with its output, temp, user and database inside a scratch folder, and is always shut down.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import websocket

from .host import comfy_path

TEXT_EVENT = 3  # the host's BinaryEventTypes.TEXT (protocol.py), not importable before the host is


class PromptRejectedError(RuntimeError):
    """POST /prompt refused the graph (validation failed); `.body` holds the server's answer."""

    def __init__(self, body: dict) -> None:
        super().__init__(json.dumps(body, indent=1))
        self.body = body


@dataclass
class PromptResult:
    prompt_id: str
    status: str  # "success" or "error"
    history: dict
    messages: list[dict] = field(default_factory=list)  # websocket messages about this prompt

    @classmethod
    def from_history(cls, prompt_id: str, history: dict) -> PromptResult:
        """The result as /history records it (its status messages carry no arrival times)."""
        messages = [{"type": kind, "data": data} for kind, data in history["status"]["messages"]]
        return cls(prompt_id, history["status"]["status_str"], history, messages)

    @property
    def error(self) -> dict | None:
        return next((m["data"] for m in self.messages if m["type"] == "execution_error"), None)

    @property
    def interrupted(self) -> bool:
        return any(m["type"] == "execution_interrupted" for m in self.messages)

    def outputs(self, node_id: str) -> dict:
        return self.history["outputs"].get(node_id, {})

    def seconds_in(self, node_id: str) -> float:
        """Wall time the server spent in one node, from the websocket's `executing` messages."""
        starts = [m["received"] for m in self.messages if m["type"] == "executing"]
        nodes = [m["data"].get("node") for m in self.messages if m["type"] == "executing"]
        index = nodes.index(node_id)
        end = starts[index + 1] if index + 1 < len(starts) else self.messages[-1]["received"]
        return end - starts[index]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ComfyServer:
    def __init__(self, scratch: Path, extra_model_paths: Path | None = None, start_timeout: float = 180.0,
                 output_dir: Path | None = None, extra_args: tuple[str, ...] = ()) -> None:
        self.scratch = scratch
        self.output_dir = output_dir or scratch / "output"
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.client_id = uuid.uuid4().hex
        self.extra_model_paths = extra_model_paths
        self.start_timeout = start_timeout
        self.extra_args = extra_args  # e.g. ("--cache-none",)
        self.log_path = scratch / "server.log"
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> ComfyServer:
        for name in ("temp", "user", "input"):
            (self.scratch / name).mkdir(parents=True, exist_ok=True)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable, "main.py", "--cpu", "--use-pytorch-cross-attention",
            "--listen", "127.0.0.1", "--port", str(self.port), "--disable-auto-launch",
            "--output-directory", str(self.output_dir), "--temp-directory", str(self.scratch / "temp"),
            "--input-directory", str(self.scratch / "input"), "--user-directory", str(self.scratch / "user"),
            "--database-url", "sqlite:///:memory:",
        ]
        if self.extra_model_paths is not None:
            command += ["--extra-model-paths-config", str(self.extra_model_paths)]
        command += self.extra_args
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(command, cwd=comfy_path(), stdout=self._log, stderr=subprocess.STDOUT,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            self._wait_until_ready()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.process.returncode} at start-up:\n{self.log()[-4000:]}")
            try:
                self.get("/system_stats")
                return
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.5)
        raise TimeoutError(f"ComfyUI did not answer within {self.start_timeout} s:\n{self.log()[-4000:]}")

    def get(self, path: str) -> dict:
        with self.open(path) as response:
            return json.loads(response.read())

    def open(self, path: str):
        """GET any path (a file the server serves); raises HTTPError for 4xx/5xx."""
        return urllib.request.urlopen(self.url + path, timeout=30)

    def post(self, path: str, body: dict) -> dict:
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as error:
            raise PromptRejectedError(json.loads(error.read() or b"{}")) from error

    def connect(self, timeout: float = 600.0) -> websocket.WebSocket:
        """The websocket this client's prompts report on (progress, executing, errors)."""
        return websocket.create_connection(f"ws://127.0.0.1:{self.port}/ws?clientId={self.client_id}", timeout=timeout)

    def queue(self, graph: dict) -> str:
        """POST /prompt without waiting; returns the prompt id."""
        return self.post("/prompt", {"prompt": graph, "client_id": self.client_id})["prompt_id"]

    def run(self, graph: dict, timeout: float = 600.0) -> PromptResult:
        """Queue an API-format graph and wait until it has finished, successfully or not."""
        ws = self.connect(timeout)
        try:
            prompt_id = self.queue(graph)
            messages = self._follow(ws, prompt_id, timeout)
        finally:
            ws.close()
        history = self._history(prompt_id)
        status = "error" if any(m["type"] == "execution_error" for m in messages) else "success"
        return PromptResult(prompt_id, status, history, messages)

    def run_alone(self, graph: dict, timeout: float = 600.0) -> PromptResult:
        """Run a graph from scratch: the server first drops every cached node output and model
        (POST /free, applied by the idle worker), and the result must show no cached node."""
        for _ in range(3):
            self.post("/free", {"unload_models": True, "free_memory": True})
            time.sleep(0.2)  # the idle worker wakes on the flag at once; a prompt queued first would win
            result = self.run(graph, timeout)
            if not any(m["type"] == "execution_cached" and m["data"]["nodes"] for m in result.messages):
                return result
        raise RuntimeError("POST /free did not clear the server's cache before the next prompt")

    def wait(self, prompt_id: str, timeout: float = 600.0) -> PromptResult:
        """A queued prompt's result, once /history has it."""
        return PromptResult.from_history(prompt_id, self._history(prompt_id, timeout))

    def wait_for_step(self, ws: websocket.WebSocket, prompt_id: str, step: int) -> None:
        """Block until the sampler of `prompt_id` reports `step` on `ws` (opened before queueing)."""
        while True:
            message = ws.recv()
            if not isinstance(message, str):
                continue
            message = json.loads(message)
            data = message.get("data", {})
            if data.get("prompt_id") != prompt_id:
                continue
            if message["type"] == "progress" and data["value"] >= step:
                return
            if message["type"] in ("execution_error", "execution_success", "execution_interrupted"):
                raise RuntimeError(f"prompt {prompt_id} ended ({message['type']}) before step {step}")

    def peak_memory_bytes(self) -> int:
        """The server process's peak resident memory so far (Linux VmHWM)."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) * 1024

    def _history(self, prompt_id: str, timeout: float = 30.0) -> dict:
        """The prompt's history entry: written just after the last websocket message, so poll."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry:
                return entry
            time.sleep(0.1)
        raise TimeoutError(f"no history for prompt {prompt_id} after {timeout} s")

    def _follow(self, ws, prompt_id: str, timeout: float) -> list[dict]:
        deadline = time.monotonic() + timeout
        messages = []
        while time.monotonic() < deadline:
            raw = ws.recv()
            if not isinstance(raw, str):
                if (text := _progress_text(raw)) is not None:  # text a node shows under itself (no prompt id)
                    messages.append(text)
                continue  # binary preview images
            message = json.loads(raw)
            if message.get("data", {}).get("prompt_id") != prompt_id:
                continue
            message["received"] = time.monotonic()
            messages.append(message)
            kind = message["type"]
            if kind in ("execution_error", "execution_interrupted", "execution_success"):
                return messages
            if kind == "executing" and message["data"].get("node") is None:
                return messages
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout} s")


def _progress_text(raw: bytes) -> dict | None:
    """A binary TEXT event (PromptServer.send_progress_text: event 3, then the node id's length,
    the node id and the text) as {"type": "progress_text", "data": {"node", "text"}}; None for others."""
    if len(raw) < 8 or struct.unpack(">I", raw[:4])[0] != TEXT_EVENT:
        return None
    length = struct.unpack(">I", raw[4:8])[0]
    return {"type": "progress_text", "data": {"node": raw[8:8 + length].decode(), "text": raw[8 + length:].decode()}}
