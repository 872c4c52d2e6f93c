"""The specification of cozyopenai, as tests.

Most tests talk to a real server on a loopback port, with the real openai client or
requests; the reader's pieces, the stores and a few other parts are also called directly,
in-process. The one double is the internal LLM: FakeLLM, a small OpenAI-compatible HTTP
server on loopback that records what it receives. Sections follow the module's, in its
order; the README's examples and the benchmark come last.
"""

import argparse
import ast
import contextlib
import dataclasses
import importlib.util
import io
import itertools
import json
import logging
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import types
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import openai
import pytest
import requests
from openai import OpenAI

import cozyopenai

HERE = os.path.dirname(os.path.abspath(__file__))
WORKFLOWS_PATH = os.path.join(HERE, "workflows.json")
ID_BLOCK = re.compile(r"```cozyui-conversation-identifier\n([A-Za-z0-9_-]+)\n```")


def _load_bench():
    """The benchmark module: it holds the extraction set's stand-in LLM and scorer, so the
    tests and `python bench/bench_cozyopenai.py --only reading` measure the same way."""
    spec = importlib.util.spec_from_file_location("bench_cozyopenai", os.path.join(HERE, "bench",
                                                                                   "bench_cozyopenai.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _load_bench()


class _ListeningLong(ThreadingHTTPServer):
    request_queue_size = 128   # the default 5 drops a burst of connections, which come back a second later


####################################################################################
# The fake internal LLM and the servers under test
####################################################################################

class FakeLLM:
    """An OpenAI-compatible chat-completions server that records each request.

    extractions: new user message -> the values an exact model answers for it.
    intents: new user message -> the intent it answers (default "provide").
    invent: values added to every extraction, whatever the message (a weak model).
    mode: "exact", "inventing" (adds INVENTED), "wrong_types" (strings as lists, numbers
    as strings, booleans as "yes"/"no") or "broken" (no JSON at all).
    fail_next: HTTP statuses to answer the next calls with, one each.
    refuse_json_schema: answer 400 to response_format json_schema (like llama.cpp).
    refuse_json_schema_status: when set (500, as llama-cpp-python 0.3.x does), answer
    json_schema with this status and llama.cpp's body, which names response_format.
    endless_node_stream: a node's stream sends a token every endless_seconds (20 ms) until
    the client goes away; endless_stream_ended is set when that handler has ended, at ended_at.
    hold: a call kind ("extraction") answered by no word until the client closes its connection
    (a slow model's long silence); held_call_started is set when such a call comes,
    held_call_closed when it was closed, at ended_at.
    gate: an Event each chat completion waits on (10 s at most) before it is answered;
    answered counts the calls answered so far.
    question: the question call's answer; a list is streamed piece by piece, stream_gate (an
    Event, 10 s at most) waited on before piece stream_gate_at (1), piece_seconds between the others;
    pieces_sent counts those handed to the socket, and stream_cut is set when the client closed
    the stream early.
    """

    def __init__(self):
        self.calls = []
        self.extractions = {}
        self.invent = {}
        self.intents = {}
        self.mode = "exact"
        self.fail_next = []
        self.refuse_json_schema = False
        self.refuse_json_schema_status = None
        self.endless_node_stream = False
        self.endless_stream_ended = threading.Event()
        self.endless_seconds = 0.02
        self.hold, self.held_call_closed, self.ended_at = None, threading.Event(), None
        self.held_call_started = threading.Event()
        self.closed = threading.Event()
        self.broken_json = False
        self.question = "Paris is a wonderful choice! What is your budget, and when would you like to go?"
        self.follow_ups = []       # the suggestions call's answer (follow-ups in the user's language)
        self.node_tokens = ["Day 1: the Louvre. ", "Day 2: Montmartre. ", "Day 3: a day in Versailles."]
        self.http_routes = {}      # path -> (status, json body), for http node tests
        self.delay_seconds = 0     # before answering a chat completion (timeouts, races)
        self.gate, self.answered = None, 0
        self.stream_gate, self.piece_seconds, self.pieces_sent, self.stream_cut = None, 0, 0, threading.Event()
        self.stream_gate_at = 1
        self.http_requests = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                fake.http_requests.append(self.path)
                status, body = fake.http_routes.get(self.path.split("?")[0], (404, {"error": "no route"}))
                self._send(status, json.dumps(body).encode(), "application/json")

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.calls.append(body)
                if fake.hold and call_kind(body) == fake.hold:
                    return self._hold()
                time.sleep(fake.delay_seconds)
                if fake.gate is not None:
                    fake.gate.wait(10)
                fake.answered += 1
                if fake.fail_next:
                    status = fake.fail_next.pop(0)
                    return self._send(status, b'{"error": {"message": "injected"}}', "application/json")
                schema = (body.get("response_format") or {}).get("type") == "json_schema"
                if schema and fake.refuse_json_schema:
                    return self._send(400, b'{"error": {"message": "json_schema unsupported"}}', "application/json")
                if schema and fake.refuse_json_schema_status:
                    return self._send(fake.refuse_json_schema_status, LLAMA_CPP_REFUSAL, "application/json")
                if body.get("stream") and fake.endless_node_stream and call_kind(body) == "node":
                    return self._stream_without_end()
                pieces = fake.answer(body)
                if body.get("stream"):
                    self.send_response(200)
                    self.send_header("Content-Type", "text/event-stream")
                    self.end_headers()
                    capped = len(pieces) > body.get("max_tokens", len(pieces))   # a piece counts as a token
                    for index, piece in enumerate(pieces[:body.get("max_tokens")]):
                        if index == fake.stream_gate_at and fake.stream_gate is not None:
                            fake.stream_gate.wait(10)
                        elif index:
                            time.sleep(fake.piece_seconds)
                        chunk = {"id": "x", "object": "chat.completion.chunk", "created": 1, "model": "fake",
                                 "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}
                        fake.pieces_sent += 1   # counted before it is written: the client may read it first
                        try:
                            self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
                            self.wfile.flush()
                        except OSError:   # the client closed the stream
                            fake.stream_cut.set()
                            return
                    chunk = {"id": "x", "object": "chat.completion.chunk", "created": 1, "model": "fake",
                             "choices": [{"index": 0, "delta": {}, "finish_reason": "length" if capped else "stop"}]}
                    self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
                    self.wfile.write(b"data: [DONE]\n\n")
                    return
                reply = {"id": "x", "object": "chat.completion", "created": 1, "model": "fake",
                         "choices": [{"index": 0, "finish_reason": "stop",
                                      "message": {"role": "assistant", "content": "".join(pieces)}}],
                         "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
                self._send(200, json.dumps(reply).encode(), "application/json")

            def _stream_without_end(self):
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                chunk = {"id": "x", "object": "chat.completion.chunk", "created": 1, "model": "fake",
                         "choices": [{"index": 0, "delta": {"content": "and on "}, "finish_reason": None}]}
                try:
                    while not fake.closed.is_set():
                        self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
                        self.wfile.flush()
                        if self._closed_within(fake.endless_seconds):
                            break
                except OSError:   # the client went away: this handler thread ends
                    pass
                finally:
                    fake.ended_at = time.monotonic()
                    fake.endless_stream_ended.set()

            def _hold(self):
                fake.held_call_started.set()
                if self._closed_within(10):
                    fake.ended_at = time.monotonic()
                    fake.held_call_closed.set()

            def _closed_within(self, seconds):
                """Whether the client closed the connection within ``seconds``."""
                deadline = time.monotonic() + seconds
                while time.monotonic() < deadline:
                    readable, _, _ = select.select([self.connection], [], [], min(0.01, seconds))
                    if readable and self.connection.recv(1, socket.MSG_PEEK) == b"":
                        return True
                return False

            def _send(self, status, data, content_type):
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = _ListeningLong(("127.0.0.1", 0), Handler)
        self.server.daemon_threads, self.server.block_on_close = True, False
        self.server.handle_error = lambda request, address: None   # clients that gave up (timeouts)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def answer(self, body):
        kind = call_kind(body)
        if kind == "extraction":
            if self.broken_json or self.mode == "broken":
                return ["Sure! Here are the values: {destination: Paris"]
            new_message = body["messages"][-1]["content"]
            invented = INVENTED if self.mode == "inventing" else self.invent
            values = {**invented, **self.extractions.get(new_message, {})}
            if self.mode == "wrong_types":
                values = {name: bench.wrong_type(value) for name, value in values.items()}
            answer = {"values": values, "intent": self.intents.get(new_message, "provide")}
            if "question" in body["messages"][0]["content"]:   # single-call mode asks for one
                answer["question"] = self.question
            return [json.dumps(answer)]
        if kind == "question":
            return list(self.question) if isinstance(self.question, list) else [self.question]
        if body["messages"][0]["content"].startswith(cozyopenai.SUGGESTIONS_PROMPT[:40]):
            return [json.dumps({"follow_ups": self.follow_ups})]
        return self.node_tokens

    def calls_of(self, kind):
        return [call for call in self.calls if call_kind(call) == kind]

    def settings(self, **options):
        return cozyopenai.LLMSettings(base_url=self.url + "/v1", model="fake-model", api_key="sk-llm-key", **options)

    def close(self):
        self.closed.set()
        self.server.shutdown()
        self.server.server_close()


# What llama-cpp-python 0.3.x answers to response_format json_schema: a 500 whose body names the field.
LLAMA_CPP_REFUSAL = json.dumps({"error": {
    "message": "1 validation error for CreateChatCompletionRequest\nresponse_format.type\n  Input should be "
               "'text' or 'json_object' [type=literal_error, input_value='json_schema', input_type=str]",
    "type": "internal_server_error"}}).encode()


INVENTED = bench.INVENTED


call_kind = bench.StandInLLM.kind


class Server:
    """A real cozyopenai server on a free loopback port."""

    def __init__(self, app, limits=None):
        self.app = app
        self.httpd = cozyopenai.create_server(app, "127.0.0.1", 0, limits or cozyopenai.ServerLimits())
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        self.client = OpenAI(api_key="unused", base_url=self.url + "/openai")
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def post(self, body, **kwargs):
        return requests.post(self.url + "/openai/chat/completions", json=body, timeout=10, **kwargs)

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


class Chat:
    """One chat as a client keeps it: the whole history goes back every turn."""

    def __init__(self, server, model="trip-planner", stream=False):
        self.server, self.model, self.stream = server, model, stream
        self.messages = []

    def say(self, text):
        self.messages.append({"role": "user", "content": text})
        reply = ask(self.server, self.model, self.messages, stream=self.stream)
        self.messages.append({"role": "assistant", "content": reply})
        return reply


def ask(server, model, messages, stream=False):
    """The reply's text, through the real openai client."""
    if stream:
        chunks = server.client.chat.completions.create(model=model, messages=messages, stream=True)
        return "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    return server.client.chat.completions.create(model=model, messages=messages).choices[0].message.content


def answer_of(reply):
    """The reply without its thinking block and identifier block."""
    return cozyopenai.clean_reply(reply)


def thinking_of(reply):
    match = re.search(r"<thinking>\n(.*?)</thinking>", reply, re.S)
    return match.group(1) if match else ""


@pytest.fixture
def fake_llm():
    fake = FakeLLM()
    yield fake
    fake.close()


@pytest.fixture
def start():
    """start(**make_app arguments, limits=ServerLimits) -> a running Server; all are stopped after the test."""
    servers = []

    def starter(workflows=WORKFLOWS_PATH, limits=None, **options):
        options.setdefault("store", "memory")
        server = Server(cozyopenai.make_app(workflows, **options), limits)
        servers.append(server)
        return server
    yield starter
    for server in servers:
        server.close()


def workflow(name="echo", nodes=None, query_inputs=None, fixed_inputs=None, description="Echoes its input."):
    """A small workflow as a dict, for tests that need their own."""
    return {
        "name": name, "description": description,
        "query_inputs": query_inputs if query_inputs is not None else
        {"word": {"description": "A word to echo back.", "type": "string"}},
        "fixed_inputs": fixed_inputs or {},
        "nodes": nodes or [
            {"id": "say", "type": "template", "description": "Repeats the word.",
             "inputs": {"template": "You said {word}.", "word": {"query": "word"}}},
            {"id": "answer", "type": "output", "inputs": {"text": {"link": "say"}}},
        ],
    }


def latest_values(record):
    """The values of a stored conversation's newest turn (records keep a snapshot per turn)."""
    return record["snapshots"][-1]["values"]


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(condition, failure, seconds=10):
    """Wait until ``condition()`` holds; once ``seconds`` have passed, fail the test with
    ``failure``. For what no event announces (a record saved, a port answering)."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, failure
        time.sleep(0.01)


@pytest.fixture(scope="module")
def trip_planner():
    """The shipped trip-planner workflow, for tests that call the reader's pieces directly."""
    return cozyopenai.load_workflows(WORKFLOWS_PATH)["trip-planner"]


def new_conversation(model="trip-planner", **state):
    """A conversation that has just started (or with ``state``, such as the inputs just asked for)."""
    return cozyopenai.Conversation(id="x" * 32, model=model, **state)


@contextlib.contextmanager
def command_line_server(*arguments, cwd=None):
    port = free_port()
    process = subprocess.Popen([sys.executable, os.path.join(HERE, "cozyopenai.py"), "--port", str(port),
                                *arguments], cwd=cwd or HERE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    server = types.SimpleNamespace(url=f"http://127.0.0.1:{port}", process=process)

    def answers():
        if process.poll() is not None:
            output = process.stdout.read().decode(errors="replace")
            pytest.fail(f"the server exited with status {process.returncode} before answering: {output[-2000:]}")
        with contextlib.suppress(requests.ConnectionError):
            requests.get(server.url + "/health", timeout=1)
            return True
        return False
    try:
        wait_until(answers, f"the server started with {' '.join(arguments)} did not answer /health within 15 s",
                   seconds=15)
        yield server
    finally:
        process.kill()
        process.wait(10)
        process.stdout.close()


def server_chat(server, model, text):
    return requests.post(server.url + "/openai/chat/completions", timeout=10, json={
        "model": model, "messages": [{"role": "user", "content": text}]}).json()["choices"][0]["message"]["content"]


def python_with_the_module(code, cwd, **variables):
    """Run ``code`` in a new interpreter that can import cozyopenai, configured by COZYOPENAI_*
    ``variables`` (the shipped workflows and the memory store unless given); ``get(path)``
    is there to send one GET through ``cozyopenai.app``."""
    prelude = ("import cozyopenai, json, logging, os, wsgiref.util\n"
               "def get(path, statuses=None):\n"
               "    environ = {}; wsgiref.util.setup_testing_defaults(environ); environ['PATH_INFO'] = path\n"
               "    return b''.join(cozyopenai.app(environ, lambda status, *rest: None if statuses is None else statuses.append(status)))\n")
    settings = {"COZYOPENAI_WORKFLOWS": WORKFLOWS_PATH, "COZYOPENAI_STORE": "memory", **variables}
    return subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, timeout=30,
                          cwd=cwd, env={**os.environ, **settings, "PYTHONPATH": HERE})


def open_webui_history(reply):
    """What Open WebUI sends back of a streamed reply: the reasoning it recognised removed, trimmed."""
    return re.sub(r"<thinking>.*?</thinking>", "", reply, flags=re.S).strip()


class OpenWebUIChat:
    """A chat as Open WebUI 0.12.4 keeps it and sends it: replies with their thinking block
    removed and trimmed, branches made by editing or regenerating, instructions dropped."""

    def __init__(self, server, model="trip-planner"):
        self.server, self.model, self.messages = server, model, []

    def send(self, messages):
        reply = ask(self.server, self.model, messages, stream=True)
        return reply, messages + [{"role": "assistant", "content": open_webui_history(reply)}]

    def say(self, text):
        reply, self.messages = self.send(self.messages + [{"role": "user", "content": text}])
        return reply


####################################################################################
# Errors
####################################################################################

def test_each_error_becomes_an_openai_error_object_with_its_status_type_and_code():
    missing = cozyopenai.ModelNotFoundError("The model 'x' does not exist.", param="model")
    assert isinstance(missing, cozyopenai.RequestError) and missing.status == 404
    assert missing.to_openai() == {"error": {"message": "The model 'x' does not exist.", "type": "invalid_request_error",
                                             "param": "model", "code": "model_not_found"}}
    down = cozyopenai.LLMError("HTTP 500", upstream_status=500)
    assert isinstance(down, cozyopenai.UpstreamError) and down.status == 502 and down.reason == "HTTP 500"
    assert down.to_openai()["error"]["type"] == "upstream_error"
    assert cozyopenai.LLMError("HTTP 400", upstream_status=400).status == 400   # the request was at fault
    assert cozyopenai.StoreUnavailable("Redis is down").status == 503
    for status, error in cozyopenai.HTTP_STATUS_ERRORS.items():   # Bottle's own errors leave as ours
        assert issubclass(error, cozyopenai.CozyError) and error.status == status


####################################################################################
# Workflows: the file format and its checks
####################################################################################

def _broken(change):
    data = {"workflows": [workflow()]}
    change(data["workflows"][0], data)
    return data


BROKEN_FILES = {
    "unknown node type": (lambda w, d: w["nodes"][0].update(type="templat"),
                          "workflow 'echo', node 'say': unknown node type 'templat'"),
    "dangling link": (lambda w, d: w["nodes"][1]["inputs"].update(text={"link": "nowhere"}),
                      "node 'answer': input 'text' links to node 'nowhere', which does not exist"),
    "cycle": (lambda w, d: w["nodes"][0]["inputs"].update(extra={"link": "answer"}),
              "workflow 'echo': the links form a cycle through nodes answer, say"),
    "cycle with a node downstream of it": (
        lambda w, d: (w["nodes"][0]["inputs"].update(extra={"link": "answer"}),
                      w["nodes"].append({"id": "tail", "type": "template", "inputs": {"template": "{x}",
                                                                                      "x": {"link": "say"}}})),
        "the links form a cycle through nodes answer, say;"),
    "created that is not a Unix time": (lambda w, d: w.update(created="yesterday"),
                                        "workflow 'echo': 'created' is a Unix time in whole seconds"),
    "default on a required input": (lambda w, d: w["query_inputs"]["word"].update(default="hi"),
                                    "query input 'word': a 'default' needs \"optional\": true"),
    "synonyms for a text input": (lambda w, d: w["query_inputs"]["word"].update(synonyms={"a": ["b"]}),
                                  "query input 'word': 'synonyms' are for inputs of type choice, boolean or a number type"),
    "cues that are not a list of words": (lambda w, d: w["query_inputs"]["word"].update(cues="trip to"),
                                          "query input 'word': 'cues' must be a list of words"),
    "translations keyed by a language name": (
        lambda w, d: w["query_inputs"]["word"].update(translations={"French": {"label": "mot"}}),
        "query input 'word': 'translations' are keyed by a two-letter language code other than 'en'"),
    "a translation with an empty question": (
        lambda w, d: w["query_inputs"]["word"].update(translations={"fr": {"label": "mot", "question": " "}}),
        "query input 'word', translation 'fr': an object with a 'label' and a 'question', each a non-empty text"),
    "a translated choice the input does not have": (
        lambda w, d: w["query_inputs"]["word"].update(translations={"fr": {"label": "mot", "choices": {"a": "b"}}}),
        "query input 'word', translation 'fr': 'choices' names each of the input's choices (it has none)"),
    "a translated label with no word": (
        lambda w, d: w["query_inputs"]["word"].update(translations={"fr": {"label": "42"}}),
        "query input 'word', translation 'fr': the label needs a word"),
    "duplicate name": (lambda w, d: d["workflows"].append(workflow()),
                       "workflow 'echo': the name is used twice"),
    "input neither fixed nor query": (lambda w, d: w["nodes"][0]["inputs"].update(word=None),
                                      "node 'say', input 'word': is neither linked, fixed nor a query input"),
    "undefined query input": (lambda w, d: w["nodes"][0]["inputs"].update(word={"query": "wrod"}),
                              "node 'say', input 'word': query input 'wrod' is not defined"),
    "undefined fixed input": (lambda w, d: w["nodes"][0]["inputs"].update(word={"fixed": "key"}),
                              "node 'say', input 'word': fixed input 'key' is not defined"),
    "query input without description": (lambda w, d: w["query_inputs"]["word"].pop("description"),
                                        "workflow 'echo', query input 'word': needs a 'description'"),
    "bad type": (lambda w, d: w["query_inputs"]["word"].update(type="text"),
                 "query input 'word': unknown type 'text'"),
    "choice without choices": (lambda w, d: w["query_inputs"]["word"].update(type="choice"),
                               "query input 'word': type 'choice' needs a non-empty 'choices' list"),
    "no output node": (lambda w, d: w["nodes"].pop(),
                       "workflow 'echo': needs exactly one node of type 'output'"),
    "bad slug": (lambda w, d: w.update(name="Trip Planner"), "'name' must be a slug"),
    "python function not importable": (
        lambda w, d: w["nodes"].insert(0, {"id": "calc", "type": "python", "inputs": {"function": "nosuchmod:f"}}),
        "node 'calc': No module named 'nosuchmod'"),
    "user chooses a URL": (
        lambda w, d: w["nodes"].insert(0, {"id": "get", "type": "http", "inputs": {"url": {"query": "word"}}}),
        "node 'get': input 'url' must be written in the workflow file"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_FILES))
def test_invalid_workflows_give_one_clear_message_naming_workflow_and_node(case):
    change, expected = BROKEN_FILES[case]
    with pytest.raises(cozyopenai.WorkflowFileError) as caught:
        cozyopenai.load_workflows(_broken(change))
    assert expected in caught.value.message


def test_command_line_exits_non_zero_with_the_message_on_an_invalid_workflows_file(tmp_path):
    path = tmp_path / "workflows.json"
    path.write_text(json.dumps(_broken(BROKEN_FILES["cycle"][0])))
    result = subprocess.run([sys.executable, os.path.join(HERE, "cozyopenai.py"), "--workflows", str(path),
                             "--store", "memory"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert f"{path}: workflow 'echo': the links form a cycle" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_value_written_in_the_file_is_checked_in_its_inputs_own_type_and_bounds():
    month = cozyopenai.QueryInput("month", "The month.", type="integer", minimum=1, maximum=12)
    assert cozyopenai.check_value(month, 12) == 12 and cozyopenai.check_value(month, 3.0) == 3
    for value, reason in ((13, "must be at most 12, not 13"), (2.5, "a whole number"), ("5", "a number"),
                          (True, "a number")):
        with pytest.raises(ValueError, match=reason):
            cozyopenai.check_value(month, value)
    assert cozyopenai.coerce_value(month, "5") == 5   # what a user writes is read; what a file holds is typed
    pace = cozyopenai.QueryInput("pace", "Pace.", type="choice", choices=("relaxed", "packed"))
    assert cozyopenai.check_value(pace, "packed") == "packed"
    with pytest.raises(ValueError, match="the pace is one of relaxed, packed, not 'calm'"):
        cozyopenai.check_value(pace, "calm")
    with pytest.raises(ValueError, match="I need true or false for the children, not 'yes'"):
        cozyopenai.check_value(cozyopenai.QueryInput("children", "Kids?", type="boolean"), "yes")
    with pytest.raises(ValueError, match="I need an email address for the contact"):
        cozyopenai.check_value(cozyopenai.QueryInput("contact", "Email.", type="email"), "nobody")
    assert cozyopenai.check_value(cozyopenai.QueryInput("city", "A city."), "  Oslo ") == "Oslo"


def test_fixed_input_secrets_never_appear_in_replies_or_the_model_list(start, fake_llm):
    secret = "sk-test-9f8e7d6c5b4a3210"
    fake_llm.http_routes["/echo"] = (500, {})
    nodes = [
        {"id": "get", "type": "http", "inputs": {"url": fake_llm.url + "/echo?key={key}&q={word}",
                                                 "key": {"fixed": "api_key"}, "word": {"query": "word"}}},
        {"id": "answer", "type": "output", "inputs": {"text": {"link": "get"}}},
    ]
    server = start([workflow(nodes=nodes, fixed_inputs={"api_key": secret})])
    reply = Chat(server, "echo", stream=True).say(f"word: {secret}")
    assert secret not in reply and "[redacted]" in reply
    assert secret not in requests.get(server.url + "/openai/models", timeout=5).text


def test_a_planted_secret_never_leaves_the_server(start, fake_llm, caplog):
    secret = "sk-planted-0123456789abcdef"

    def leaky(inputs, context):
        raise RuntimeError(f"upstream refused key {inputs['key']}")
    fake_llm.http_routes["/echo"] = (500, {})
    workflows = [
        workflow(name="via-http", fixed_inputs={"api_key": secret}, nodes=[
            {"id": "get", "type": "http", "inputs": {"url": fake_llm.url + "/echo?key={key}&q={word}",
                                                     "key": {"fixed": "api_key"}, "word": {"query": "word"}}},
            {"id": "answer", "type": "output", "inputs": {"text": {"link": "get"}}}]),
        workflow(name="via-python", fixed_inputs={"token": secret}, nodes=[
            {"id": "call", "type": "leaky", "inputs": {"key": {"fixed": "token"}, "w": {"query": "word"}}},
            {"id": "answer", "type": "output", "inputs": {"text": {"link": "call"}}}]),
        workflow(name="via-template", fixed_inputs={"password": secret}, nodes=[
            {"id": "say", "type": "template", "inputs": {"template": "{p} {word}", "p": {"fixed": "password"},
                                                         "word": {"query": "word"}}},
            {"id": "answer", "type": "output", "inputs": {"text": {"link": "say"}}}]),
    ]
    server = start(workflows, node_types={"leaky": cozyopenai.NodeType(leaky)})
    seen = [requests.get(server.url + "/openai/models", timeout=5).text]
    for name in ("via-http", "via-python", "via-template"):
        seen.append(requests.get(server.url + f"/openai/models/{name}", timeout=5).text)
        for stream in (False, True):
            chat = Chat(server, name, stream=stream)
            seen += [chat.say(f"word: {secret}"), chat.say("word: again")]
        seen.append(server.post({"model": name, "messages": [{"role": "user", "content": secret}], "n": 3}).text)
    seen += [record.getMessage() for record in caplog.records]
    assert any("[redacted]" in text for text in seen)
    assert not [text for text in seen if secret in text]


def test_a_secret_an_llm_echoes_across_two_streamed_tokens_is_redacted(start, fake_llm):
    secret = "sk-split-0123456789abcdef"
    fake_llm.node_tokens = ["Your key is sk-spl", "it-0123456789", "abcdef, keep it safe."]
    nodes = [{"id": "echo", "type": "llm", "inputs": {"prompt": "Say {word}", "key": {"fixed": "api_key"},
                                                      "word": {"query": "word"}}},
             {"id": "answer", "type": "output", "inputs": {"text": {"link": "echo"}}}]
    server = start([workflow(nodes=nodes, fixed_inputs={"api_key": secret})], llm=fake_llm.settings())
    fake_llm.extractions = {"word: hi": {"word": "hi"}}
    for stream in (True, False):
        reply = Chat(server, "echo", stream=stream).say("word: hi")
        assert answer_of(reply) == "Your key is [redacted], keep it safe."
        assert "sk-spl" not in reply and "0123456789abcdef" not in reply


def test_overlapping_secrets_are_redacted_whole():
    redact = cozyopenai.Redactor(["abcd", "abcdefgh"])
    assert redact("xxabcdefgh") == "xx[redacted]"
    assert "".join(text for _, text in redact.stream(iter([("content", "xxabc"), ("content", "defgh!")]))) == \
        "xx[redacted]!"


def test_a_fixed_input_fed_to_a_secret_named_node_input_is_redacted(start):
    nodes = [{"id": "say", "type": "template", "inputs": {"template": "{token} {word}", "token": {"fixed": "site"},
                                                          "word": {"query": "word"}}},
             {"id": "answer", "type": "output", "inputs": {"text": {"link": "say"}}}]
    server = start([workflow(nodes=nodes, fixed_inputs={"site": "open sesame"})])
    reply = Chat(server, "echo").say("word: hello")
    assert "hello" in answer_of(reply) and "[redacted]" in reply and "sesame" not in reply


####################################################################################
# Node types, and loading a workflows file with them
####################################################################################

def test_shipped_workflows_file_loads_with_the_document_trip_planner():
    workflows = cozyopenai.load_workflows(WORKFLOWS_PATH)
    assert len(workflows) >= 3
    trip = workflows["trip-planner"]
    assert {"destination", "budget", "travel_dates"} <= set(trip.query_inputs)
    assert {node.type for w in workflows.values() for node in w.nodes} >= {"template", "llm", "http", "python",
                                                                            "output"}


def test_workflows_file_that_is_not_json_names_the_file_and_line(tmp_path):
    path = tmp_path / "workflows.json"
    path.write_text('{"workflows": [\n  {"name": "x",,}\n]}')
    with pytest.raises(cozyopenai.WorkflowFileError, match=r"workflows.json: not valid JSON: .*line 2"):
        cozyopenai.load_workflows(str(path))


def test_run_from_another_folder_it_finds_the_workflows_beside_it_and_their_python_modules(tmp_path):
    with command_line_server("--store", "memory", cwd=tmp_path) as server:
        models = requests.get(server.url + "/openai/models", timeout=5).json()["data"]
        assert [model["id"] for model in models] == ["trip-planner", "month-calendar", "weather-now"]
    (tmp_path / "mytools.py").write_text("def shout(text):\n    return text.upper()\n")
    (tmp_path / "workflows.json").write_text(json.dumps({"workflows": [workflow(nodes=[
        {"id": "loud", "type": "python", "inputs": {"function": "mytools:shout", "text": {"query": "word"}}},
        {"id": "answer", "type": "output", "inputs": {"text": {"link": "loud"}}}])]}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with command_line_server("--store", "memory", "--workflows", str(tmp_path / "workflows.json"),
                             cwd=elsewhere) as server:
        reply = server_chat(server, "echo", "word: quiet")
    assert answer_of(reply) == "QUIET"


def test_a_python_module_beside_the_workflows_file_runs_without_changing_sys_path_or_sys_modules(tmp_path):
    for folder, mark in (("one", "!"), ("two", "?")):   # two files, each with a mytools.py of its own
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "mytools.py").write_text(f"def shout(text):\n    return text.upper() + {mark!r}\n")
        (tmp_path / folder / "workflows.json").write_text(json.dumps({"workflows": [workflow(nodes=[
            {"id": "loud", "type": "python", "inputs": {"function": "mytools:shout", "text": {"query": "word"}}},
            {"id": "answer", "type": "output", "inputs": {"text": {"link": "loud"}}}])]}))
    path, modules, answers = list(sys.path), dict(sys.modules), {}
    for folder in ("one", "two"):
        echo = cozyopenai.load_workflows(str(tmp_path / folder / "workflows.json"))["echo"]
        answers[folder] = list(cozyopenai.run_workflow(echo, {"word": "quiet"}))[-1].text
    assert answers == {"one": "QUIET!", "two": "QUIET?"}
    assert sys.path == path and sys.modules == modules and "mytools" not in sys.modules


def test_template_node_reads_dotted_paths_into_linked_outputs(start):
    nodes = [
        {"id": "data", "type": "python", "inputs": {"function": "json:loads", "s": {"query": "word"}}},
        {"id": "say", "type": "template", "inputs": {"template": "first={d.items.0} name={d.name}",
                                                      "d": {"link": "data"}}},
        {"id": "answer", "type": "output", "inputs": {"text": {"link": "say"}}},
    ]
    server = start([workflow(nodes=nodes)])
    reply = Chat(server, "echo").say('word: {"items": [7, 8], "name": "Ada"}')
    assert answer_of(reply) == "first=7 name=Ada"


def test_booleans_read_yes_or_no_in_replies_thinking_and_templates(start, fake_llm):
    fake_llm.question = ""   # no question from the LLM: the templated one
    chat = Chat(start(llm=fake_llm.settings()))
    reply = chat.say("destination: Paris\nchildren: yes")
    assert answer_of(reply).startswith("Got it: destination Paris and children yes.")
    assert "Understood children: yes." in thinking_of(reply) and "True" not in reply
    reply = chat.say("budget: 2000\ntravel dates: May\nchildren: no")
    assert "Changed children: yes → no." in thinking_of(reply) and "children = no" in thinking_of(reply)
    assert "Children coming along: no." in fake_llm.calls_of("node")[-1]["messages"][-1]["content"]
    assert "False" not in json.dumps(fake_llm.calls_of("node")[-1]["messages"])
    assert cozyopenai.render_template("{a} {b} {c:.1f}", {"a": True, "b": 2000.0, "c": 2.0}) == "yes 2000 2.0"


def test_http_node_sends_the_users_value_url_encoded_and_returns_the_json(start, fake_llm):
    fake_llm.http_routes["/lookup"] = (200, {"answer": "found it"})
    nodes = [
        {"id": "get", "type": "http", "description": "Looks the word up.",
         "inputs": {"url": fake_llm.url + "/lookup?q={word}", "word": {"query": "word"}}},
        {"id": "say", "type": "template", "inputs": {"template": "{r.answer}", "r": {"link": "get"}}},
        {"id": "answer", "type": "output", "inputs": {"text": {"link": "say"}}},
    ]
    server = start([workflow(nodes=nodes)])
    reply = Chat(server, "echo").say("word: a&b=c / d")
    assert answer_of(reply) == "found it"
    assert fake_llm.http_requests == ["/lookup?q=a%26b%3Dc%20%2F%20d"]


def test_http_error_ends_the_run_with_a_clear_message_and_the_next_turn_works(start, fake_llm):
    nodes = [
        {"id": "get", "type": "http", "inputs": {"url": fake_llm.url + "/missing/{word}", "word": {"query": "word"}}},
        {"id": "answer", "type": "output", "inputs": {"text": {"link": "get"}}},
    ]
    server = start([workflow(nodes=nodes)])
    chat = Chat(server, "echo", stream=True)
    reply = chat.say("word: hello")
    assert "✗ get failed" in thinking_of(reply)
    assert "step 'get' failed (127.0.0.1 answered HTTP 404" in answer_of(reply)
    fake_llm.http_routes["/missing/again"] = (200, "fine now")
    assert answer_of(chat.say("word: again")) == "Changed the word from hello to again.\n\nfine now"


def test_python_node_calls_the_named_function_with_the_users_values(start):
    server = start()
    reply = Chat(server, "month-calendar").say("year: 2026\nmonth: 2")
    assert "February 2026" in answer_of(reply)
    assert "Mo Tu We Th Fr Sa Su" in answer_of(reply)


def test_python_node_exception_is_reported_and_the_conversation_goes_on(start):
    nodes = [{"id": "parse", "type": "python", "inputs": {"function": "json:loads", "s": {"query": "s"}}},
             {"id": "say", "type": "template", "inputs": {"template": "{r}", "r": {"link": "parse"}}},
             {"id": "answer", "type": "output", "inputs": {"text": {"link": "say"}}}]
    server = start([workflow(nodes=nodes, query_inputs={"s": {"description": "Some JSON.", "type": "string"}})])
    chat = Chat(server, "echo")
    reply = chat.say("s: [1, 2")
    assert "step 'parse' failed (json:loads raised JSONDecodeError: " in answer_of(reply)
    assert answer_of(chat.say("s: [3, 4]")).endswith("[3, 4]")


def test_a_deployment_registers_its_own_node_type(start):
    def shout(inputs, context):
        return inputs["text"].upper() + "!"
    nodes = [
        {"id": "loud", "type": "shout", "description": "Shouts.", "inputs": {"text": {"query": "word"}}},
        {"id": "answer", "type": "output", "inputs": {"text": {"link": "loud"}}},
    ]
    server = start([workflow(nodes=nodes)], node_types={"shout": cozyopenai.NodeType(shout, required=("text",))})
    assert answer_of(Chat(server, "echo").say("word: hello")) == "HELLO!"


def test_node_types_can_be_registered_with_a_decorator(start):
    node_types = cozyopenai.NodeTypes()

    @node_types.register("reverse", required=("text",))
    def reverse(inputs, context):
        return inputs["text"][::-1]
    nodes = [{"id": "flip", "type": "reverse", "inputs": {"text": {"query": "word"}}},
             {"id": "answer", "type": "output", "inputs": {"text": {"link": "flip"}}}]
    assert answer_of(Chat(start([workflow(nodes=nodes)], node_types=node_types), "echo").say("word: abc")) == "cba"


def test_llm_node_without_an_llm_uses_its_fallback_template(start):
    server = start()
    reply = Chat(server).say("destination: Lisbon\nbudget: 1500\ntravel_dates: first week of May")
    plan = answer_of(reply)
    assert "## Your trip to Lisbon" in plan
    assert "first week of May" in plan and "1500" in plan


def test_a_node_that_fails_after_streaming_part_of_the_answer_says_so_in_a_paragraph_of_its_own(start):
    def flaky(inputs, context):
        def pieces():
            yield "word0 word1"
            raise cozyopenai.NodeFailed("the source went away")
        return cozyopenai.TextStream(pieces())
    nodes = [{"id": "write", "type": "flaky", "inputs": {"w": {"query": "word"}}},
             {"id": "answer", "type": "output", "inputs": {"text": {"link": "write"}}}]
    server = start([workflow(nodes=nodes)], node_types={"flaky": cozyopenai.NodeType(flaky)})
    assert answer_of(Chat(server, "echo").say("word: x")) == (
        "word0 word1\n\nSorry, the workflow stopped: step 'write' failed (the source went away). Your inputs are "
        'kept; say "again" to retry, or change a value.')


def test_llm_node_without_an_llm_or_fallback_fails_with_a_clear_message(start):
    nodes = [{"id": "write", "type": "llm", "inputs": {"prompt": {"query": "word"}}},
             {"id": "answer", "type": "output", "inputs": {"text": {"link": "write"}}}]
    server = start([workflow(nodes=nodes)])
    assert "this node needs an LLM; start the server with --llm-base-url" in Chat(server, "echo").say("word: x")


def _llm_node_workflow(name="echo", through_template=False, **node):
    """An `llm` node on the user's word; its answer streamed straight out, or through a template."""
    nodes = [{"id": "write", "type": "llm", "inputs": {"prompt": {"query": "word"}}, **node}]
    if through_template:
        nodes.append({"id": "frame", "type": "template", "inputs": {"template": "{text}", "text": {"link": "write"}}})
    nodes.append({"id": "answer", "type": "output", "inputs": {"text": {"link": nodes[-1]["id"]}}})
    return workflow(name=name, nodes=nodes)


@pytest.mark.parametrize("through_template", [False, True])
def test_an_llm_node_past_its_time_limit_keeps_what_it_wrote_and_says_it_stopped(start, fake_llm, through_template):
    fake_llm.endless_node_stream = True
    fake_llm.extractions = {"word: loop": {"word": "loop"}}
    server = start([_llm_node_workflow(through_template=through_template, timeout_seconds=1)],
                   llm=fake_llm.settings())
    server.client = server.client.with_options(timeout=20, max_retries=0)   # this test's own deadline
    reply = Chat(server, "echo").say("word: loop")
    assert answer_of(reply).startswith("and on and on ")
    assert answer_of(reply).endswith("and on \n\n(Stopped here: the language model took longer than 1 s.)")
    if through_template:   # a streamed answer has closed the thinking block before the stream stops
        assert ("write: the language model at 127.0.0.1:%d stopped (timed out after 1 s); kept what it had "
                "written." % fake_llm.server.server_port) in thinking_of(reply)
    assert fake_llm.endless_stream_ended.wait(10)   # the upstream's connection was closed


def test_an_llm_node_whose_llm_is_down_answers_from_its_fallback_naming_only_the_host(start):
    port = free_port()
    settings = cozyopenai.LLMSettings(base_url=f"http://127.0.0.1:{port}/v1", model="fake-model",
                                      api_key="sk-llm-key")
    reply = Chat(start(llm=settings)).say("destination: Lisbon\nbudget: 1500\ntravel_dates: first week of May")
    assert "## Your trip to Lisbon" in answer_of(reply)
    assert (f"plan: the language model at 127.0.0.1:{port} did not answer (Connection error); "
            "used the fallback template.") in thinking_of(reply)
    assert "sk-llm-key" not in reply and "/v1" not in reply


def test_an_llm_node_sends_max_tokens_from_its_input_or_the_default_and_bad_ones_are_refused(start, fake_llm):
    fake_llm.extractions = {"word: hi": {"word": "hi"}}
    capped = {"prompt": {"query": "word"}, "max_tokens": 2}
    server = start([_llm_node_workflow(), _llm_node_workflow("short", through_template=True, inputs=capped)],
                   llm=fake_llm.settings())
    assert answer_of(Chat(server, "echo").say("word: hi")) == "".join(fake_llm.node_tokens)
    assert fake_llm.calls_of("node")[-1]["max_tokens"] == cozyopenai.LLM_NODE_MAX_TOKENS
    reply = Chat(server, "short").say("word: hi")
    assert fake_llm.calls_of("node")[-1]["max_tokens"] == 2
    assert answer_of(reply) == ("".join(fake_llm.node_tokens[:2])   # the fake counts a piece as a token
                                + "\n\n(Stopped here: the answer reached its limit of 2 tokens.)")
    assert "write: the answer hit its limit of 2 tokens." in thinking_of(reply)
    for bad in ("lots", 0):
        broken = _llm_node_workflow(inputs={**capped, "max_tokens": bad})
        with pytest.raises(cozyopenai.WorkflowFileError,
                           match=r"node 'write': 'max_tokens' must be a positive whole number"):
            cozyopenai.load_workflows({"workflows": [broken]})


def test_the_run_record_is_whole_after_a_streamed_answer_and_the_servers_calls_are_at_temperature_0(start, fake_llm):
    fake_llm.extractions = {"Trip to Paris.": {"destination": "Paris"}}
    server = start(llm=fake_llm.settings())
    chat = Chat(server, stream=True)
    chat.say("Trip to Paris.")
    reply = chat.say("budget: 2000\ntravel dates: May")
    answer_end = reply.index(fake_llm.node_tokens[-1]) + len(fake_llm.node_tokens[-1])
    after = reply[answer_end:]   # the node that streamed the answer finishes after it: shown there
    assert re.match(r"\n*<thinking>\n✓ plan finished in \d+\.\d\d s\n→ answer started", after.lstrip())
    assert "✓ answer finished in" in after and "plan finished" not in reply[:answer_end]
    response = server.client.responses.create(model="trip-planner", input="destination: Rome\nbudget: 900\n"
                                              "travel dates: June", stream=True)
    completed = [event for event in response if event.type == "response.completed"][0].response
    assert "✓ plan finished in" in completed.output[0].summary[0].text
    assert [call["temperature"] for call in fake_llm.calls if call_kind(call) != "node"] == [0, 0, 0]   # one a turn


def test_llm_node_tokens_stream_into_the_answer_as_they_arrive(start, fake_llm):
    server = start(llm=fake_llm.settings())
    fake_llm.extractions = {"go": {"destination": "Paris", "budget": 2000, "travel_dates": "May"}}
    fake_llm.extractions["go"] = {"destination": "go", "budget": None, "travel_dates": None}
    message = "destination go, budget 2000, travel_dates May"
    fake_llm.extractions[message] = {"destination": "go", "budget": "2000", "travel_dates": "May"}
    chunks = server.client.chat.completions.create(
        model="trip-planner", messages=[{"role": "user", "content": message}], stream=True)
    contents = [chunk.choices[0].delta.content for chunk in chunks if chunk.choices and chunk.choices[0].delta.content]
    for token in fake_llm.node_tokens:
        assert token in contents   # each token its own chunk: nothing waited for the whole answer


####################################################################################
# Runner: nodes run when all their inputs are ready
####################################################################################

def test_runner_reports_each_node_in_dependency_order_then_the_answer():
    wf = cozyopenai.load_workflows({"workflows": [workflow()]})["echo"]
    events = list(cozyopenai.run_workflow(wf, {"word": "hi"}))
    assert [(e.what, e.node_id) for e in events] == [
        ("started", "say"), ("finished", "say"), ("started", "answer"), ("finished", "answer"),
        ("answer", "answer"), ("done", "answer")]
    assert events[-1].text == "You said hi."


def test_a_node_quicker_than_5_ms_has_the_finished_line_progress_line_writes():
    # _run writes that line made once, with no float formatted: it must be the formatted one.
    import math
    for seconds in (1e-9, 0.001, 0.00499, math.nextafter(0.005, 0)):
        event = cozyopenai.RunEvent("finished", "say", "", seconds)
        assert cozyopenai._finished_at_once_line("say") == "✓ " + cozyopenai.progress_line(event) + "\n"


def test_independent_nodes_run_at_the_same_time():
    together = threading.Barrier(2, timeout=5)   # breaks unless both nodes are inside at once

    def meet(inputs, context):
        together.wait()
        return inputs["name"]
    nodes = [{"id": "a", "type": "meet", "inputs": {"name": "A"}},
             {"id": "b", "type": "meet", "inputs": {"name": "B"}},
             {"id": "both", "type": "template", "inputs": {"template": "{a}{b}", "a": {"link": "a"},
                                                            "b": {"link": "b"}}},
             {"id": "answer", "type": "output", "inputs": {"text": {"link": "both"}}}]
    types = {**cozyopenai.NODE_TYPES, "meet": cozyopenai.NodeType(meet)}
    wf = cozyopenai.load_workflows({"workflows": [workflow(nodes=nodes, query_inputs={})]}, types)["echo"]
    events = list(cozyopenai.run_workflow(wf, {}, node_types=types))
    assert events[-1].what == "done" and events[-1].text == "AB"


def test_a_failed_node_stops_the_run_before_later_nodes_start():
    def boom(inputs, context):
        raise cozyopenai.NodeFailed("no luck")
    nodes = [{"id": "first", "type": "boom", "inputs": {}},
             {"id": "later", "type": "template", "inputs": {"template": "{x}", "x": {"link": "first"}}},
             {"id": "answer", "type": "output", "inputs": {"text": {"link": "later"}}}]
    types = {**cozyopenai.NODE_TYPES, "boom": cozyopenai.NodeType(boom)}
    wf = cozyopenai.load_workflows({"workflows": [workflow(nodes=nodes, query_inputs={})]}, types)["echo"]
    events = list(cozyopenai.run_workflow(wf, {}, node_types=types))
    assert [(e.what, e.node_id) for e in events] == [("started", "first"), ("failed", "first")]
    assert events[-1].text == "no luck"


def test_a_stopped_run_starts_no_further_node():
    stop, ran = threading.Event(), []

    def first(inputs, context):
        stop.set()   # as a hang-up does, while this node runs
        return "done"

    def second(inputs, context):
        ran.append("second")
        return "never"
    nodes = [{"id": "first", "type": "first", "inputs": {}},
             {"id": "second", "type": "second", "inputs": {"x": {"link": "first"}}},
             {"id": "answer", "type": "output", "inputs": {"text": {"link": "second"}}}]
    types = {**cozyopenai.NODE_TYPES, "first": cozyopenai.NodeType(first), "second": cozyopenai.NodeType(second)}
    wf = cozyopenai.load_workflows({"workflows": [workflow(nodes=nodes, query_inputs={})]}, types)["echo"]
    events = list(cozyopenai.run_workflow(wf, {}, node_types=types, stop=stop))
    assert ran == [] and events[-1].what == "failed" and events[-1].text == "the run was stopped"


def test_a_node_past_its_timeout_fails_the_run_and_the_next_turn_works(start):
    nodes = [{"id": "nap", "type": "python", "timeout_seconds": 0.2,
              "inputs": {"function": "time:sleep", "0": {"query": "seconds"}}},
             {"id": "answer", "type": "output", "inputs": {"text": "awake"}}]
    queries = {"seconds": {"description": "How long to sleep.", "type": "number"}}
    chat = Chat(start([workflow(nodes=nodes, query_inputs=queries)]), "echo")
    assert "step 'nap' failed (did not finish within 0.2 s)" in answer_of(chat.say("seconds: 3"))
    assert answer_of(chat.say("seconds: 0")).endswith("awake")


def test_a_hang_up_aware_event_turns_set_soon_after_the_peer_closes():
    ours, theirs = socket.socketpair()
    with ours:
        event = cozyopenai.HangUpAwareEvent(ours)
        assert event.wait(0.2) is False and not event.is_set()   # the peer is still there
        closing = threading.Timer(0.1, theirs.close)
        closing.start()
        started = time.monotonic()
        assert event.wait(10) is True, "the peer's close was not noticed within 10 s"
        assert time.monotonic() - started < 2        # within a few checks, not at the timeout
        assert event.is_set()
        closing.join()


def start_hold_then_later(start, hold, later_ran):
    """A server whose "echo" workflow runs ``hold`` then a node that sets ``later_ran``: what
    stops a run must stop it before the second node."""
    def later(inputs, context):
        later_ran.set()
        return "later"
    nodes = [{"id": "hold", "type": "hold", "inputs": {"w": {"query": "word"}}},
             {"id": "later", "type": "later", "inputs": {"x": {"link": "hold"}}},
             {"id": "answer", "type": "output", "inputs": {"text": {"link": "later"}}}]
    return start([workflow(nodes=nodes)], node_types={"hold": cozyopenai.NodeType(hold),
                                                      "later": cozyopenai.NodeType(later)})


def test_a_client_that_hangs_up_mid_stream_stops_the_run_and_leaves_the_conversation_usable(start):
    inside, release, later_ran = threading.Event(), threading.Event(), threading.Event()

    stops = []

    def hold(inputs, context):
        stops.append(context.stop)        # the turn's stop signal, which notices a hang-up
        inside.set()
        release.wait(10)
        return "held"

    server = start_hold_then_later(start, hold, later_ran)
    body = json.dumps({"model": "echo", "stream": True, "messages": [{"role": "user", "content": "word: x"}]})
    client = socket.create_connection(("127.0.0.1", server.httpd.server_port))
    client.sendall(f"POST /openai/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
    client.settimeout(10)
    received = b""
    while b"hold started" not in received:
        chunk = client.recv(4096)
        assert chunk, f"the stream ended before 'hold' started: {received!r}"
        received += chunk
    assert inside.wait(5)
    client.close()                        # the client hangs up while "hold" runs
    (stop,) = stops
    # Well within the 10 s keep-alive, whose failed write would also stop the turn: this is the hang-up check.
    assert stop.wait(5), "the turn did not notice within 5 s that its client hung up"
    release.set()
    store = server.app.config["cozyopenai.service"].store
    wait_until(lambda: store._records, "the stopped turn did not save its conversation within 10 s")
    (conversation_id,) = store._records
    assert latest_values(store.load(conversation_id)) == {"word": "x"}
    assert not later_ran.is_set()
    history = [{"role": "user", "content": "word: x"},
               {"role": "assistant", "content": f"```cozyui-conversation-identifier\n{conversation_id}\n```"},
               {"role": "user", "content": "word: y"}]
    release.set()
    assert answer_of(ask(server, "echo", history)).endswith("later")   # not locked out


def _hang_up_after(server, message, seen, seconds=10, started=None):
    """Send a streamed chat request on a raw socket, read until ``seen`` arrives (or at once, with
    None), and until the Event ``started`` is set if one is given, then hang up; the moment it hung up."""
    body = json.dumps({"model": "trip-planner", "stream": True, "messages": [{"role": "user", "content": message}]})
    client = socket.create_connection(("127.0.0.1", server.httpd.server_port))
    client.sendall(f"POST /openai/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
    received, deadline = b"", time.monotonic() + seconds
    client.settimeout(seconds)
    while seen is not None and seen not in received:
        assert time.monotonic() < deadline, f"{seen!r} did not arrive within {seconds} s"
        received += client.recv(4096)
    assert started is None or started.wait(seconds), f"nothing had started {seconds} s after {seen!r}"
    client.close()
    return time.monotonic()


def test_a_hang_up_on_the_first_turn_closes_the_llm_stream_within_a_second(start, fake_llm):
    fake_llm.endless_node_stream, fake_llm.endless_seconds = True, 0.5   # a slow model: a token every 0.5 s
    server = start(llm=fake_llm.settings())
    left = _hang_up_after(server, "destination: Paris\nbudget: 2000\ntravel dates: May", b"and on ")
    assert fake_llm.endless_stream_ended.wait(5), "the LLM's stream was still read 5 s after the client left"
    assert fake_llm.ended_at - left < 1.0
    assert "cozyopenai_llm_calls_cut_total 1" in requests.get(server.url + "/metrics", timeout=5).text


def test_a_hang_up_during_the_extraction_call_closes_its_connection_long_before_its_time_out(start, fake_llm):
    fake_llm.hold = "extraction"                        # the model says nothing for a long while
    server = start(llm=fake_llm.settings(timeout_seconds=20))
    # Hung up once the call is under way: a hang-up seen before it starts makes no call at all.
    left = _hang_up_after(server, "I want to plan a trip to Paris.", b"Reading your message",
                          started=fake_llm.held_call_started)
    # The hang-up closes it, not the 20 s time-out (the margin is for a loaded machine, not a speed).
    assert fake_llm.held_call_closed.wait(5), "the extraction call was still open 5 s after the client left"
    assert fake_llm.ended_at - left < 5


####################################################################################
# The internal LLM (extraction, questions and `llm` nodes)
####################################################################################

def test_an_upstream_that_refuses_json_schema_gets_json_mode(start, fake_llm):
    fake_llm.refuse_json_schema = True
    fake_llm.extractions = {"Paris please": {"destination": "Paris"}}
    chat = Chat(start(llm=fake_llm.settings()))
    assert "Understood destination: Paris." in thinking_of(chat.say("Paris please"))
    formats = [(c.get("response_format") or {}).get("type") for c in fake_llm.calls_of("extraction")]
    assert formats == ["json_schema", "json_object"]
    chat.say("budget: 100")
    assert fake_llm.calls_of("extraction")[-1]["response_format"] == {"type": "json_object"}


def _formats(calls):
    return [(call.get("response_format") or {}).get("type") for call in calls]


def _three_turns_on_an_upstream_that_refuses_json_schema_with_a_500(start, fake_llm):
    fake_llm.refuse_json_schema_status = 500   # as llama-cpp-python 0.3.x does
    fake_llm.extractions = {"Paris please": {"destination": "Paris"}, "A budget of 100.": {"budget": 100},
                            "In May.": {"travel_dates": "May"}}
    chat = Chat(start(llm=fake_llm.settings()))
    return [chat.say(text) for text in ("Paris please", "A budget of 100.", "In May.")]


def test_an_upstream_that_refuses_json_schema_with_a_500_is_asked_once_then_gets_json_mode(start, fake_llm):
    first, second, _ = _three_turns_on_an_upstream_that_refuses_json_schema_with_a_500(start, fake_llm)
    assert "Understood destination: Paris." in thinking_of(first)
    assert "Understood budget: 100." in thinking_of(second)
    assert "simple reader" not in thinking_of(first) + thinking_of(second)
    formats = _formats(fake_llm.calls_of("extraction"))
    assert formats[:2] == ["json_schema", "json_object"]                 # no client retry of the refusal
    assert formats.count("json_schema") == 1 and set(formats[1:]) == {"json_object"} and len(formats) >= 4


def test_stepping_down_from_json_schema_is_logged_once_naming_the_host_and_not_the_key(start, fake_llm, caplog):
    caplog.set_level("WARNING", logger="cozyopenai")
    _three_turns_on_an_upstream_that_refuses_json_schema_with_a_500(start, fake_llm)
    warnings = [record.getMessage() for record in caplog.records
                if record.levelname == "WARNING" and "response_format" in record.getMessage()]
    assert warnings == [f"the language model at 127.0.0.1:{fake_llm.server.server_port} does not take "
                        "response_format json_schema; using json_object from now on"]
    assert "sk-llm-key" not in caplog.text


def test_an_outage_does_not_change_the_structured_output_mode(fake_llm):
    messages = [{"role": "system", "content": cozyopenai.EXTRACTION_PROMPT}, {"role": "user", "content": "hi"}]
    fake_llm.refuse_json_schema_status = 500
    confirmed = cozyopenai.LLMClient(fake_llm.settings())
    confirmed.complete_json(messages, {"type": "object"})     # json_schema refused, json_object answers
    seen = len(fake_llm.calls)
    fake_llm.fail_next = [500] * 4                            # an outage: 500s whose body names no format
    for _ in range(2):
        with pytest.raises(cozyopenai.UpstreamError, match="HTTP 500"):
            confirmed.complete_json(messages, {"type": "object"})
    assert confirmed.complete_json(messages, {"type": "object"})["intent"] == "provide"
    assert _formats(fake_llm.calls[seen:]) == ["json_object"] * 5   # retried as usual, never down to text

    fake_llm.refuse_json_schema_status = None
    fresh = cozyopenai.LLMClient(fake_llm.settings())
    seen = len(fake_llm.calls)
    fake_llm.fail_next = [500, 500]                           # before json_schema has ever answered
    with pytest.raises(cozyopenai.UpstreamError, match="HTTP 500"):
        fresh.complete_json(messages, {"type": "object"})
    fresh.complete_json(messages, {"type": "object"})
    assert _formats(fake_llm.calls[seen:]) == ["json_schema", "json_object", "json_schema"]


@pytest.mark.parametrize("fault", ["timeout", "refused", "429", "500", "not json"])
def test_an_llm_fault_costs_one_attempt_then_degrades_the_turn_and_keeps_every_value(start, fake_llm, fault, caplog):
    fake_llm.extractions = {"Trip to Paris.": {"destination": "Paris"}}
    settings = fake_llm.settings(timeout_seconds=0.5)
    if fault == "refused":
        settings = cozyopenai.LLMSettings(base_url=f"http://127.0.0.1:{free_port()}/v1", model="m", timeout_seconds=0.5)
        fake_llm.extractions = {}
    chat = Chat(start(llm=settings))
    first = chat.say("Trip to Paris." if fault != "refused" else "destination: Paris")
    assert "Understood destination: Paris." in thinking_of(first)
    calls_before = len(fake_llm.calls)
    fake_llm.delay_seconds = 2 if fault == "timeout" else 0
    fake_llm.fail_next = {"429": [429] * 4, "500": [500] * 4}.get(fault, [])
    fake_llm.broken_json = fault == "not json"
    started = time.monotonic()
    reply = chat.say("budget: 2000")
    assert "used the simple reader instead" in thinking_of(reply)
    assert "Understood budget: 2000." in thinking_of(reply)
    if fault in ("timeout", "429", "500"):
        extraction_calls = len(fake_llm.calls_of("extraction")) - (1 if calls_before else 0)
        assert extraction_calls == 1          # one attempt, then the simple reader: no retry doubles the wait
    if fault == "timeout":
        assert time.monotonic() - started < 1.5   # the turn's LLM calls, question included, share --llm-timeout
        assert "did not answer within" in caplog.text
    fake_llm.delay_seconds, fake_llm.fail_next, fake_llm.broken_json = 0, [], False
    fake_llm.extractions["travel_dates: May"] = {"travel_dates": "May"}
    last = chat.say("travel_dates: May")
    assert "Running trip-planner with destination = Paris, budget = 2000, travel dates = May" in thinking_of(last)


def test_broken_json_from_the_llm_degrades_to_the_simple_reader(start, fake_llm):
    fake_llm.broken_json = True
    reply = Chat(start(llm=fake_llm.settings())).say("destination: Oslo")
    assert "held no JSON object" in thinking_of(reply)
    assert "Understood destination: Oslo." in thinking_of(reply)


####################################################################################
# Conversations and their stores
####################################################################################

def test_json_store_keeps_one_file_per_conversation_and_leaves_no_temporary_files(start, tmp_path):
    server = start(store=str(tmp_path))
    for _ in range(3):
        Chat(server).say("I want to plan a trip to Paris.")
    files = sorted(name for name in os.listdir(tmp_path) if name not in (".locks", ".saving"))
    assert len(files) == 3 and all(re.fullmatch(r"[A-Za-z0-9_-]{32}\.json", f) for f in files)
    assert os.listdir(tmp_path / ".saving") == []   # every save renamed into place
    record = json.loads((tmp_path / files[0]).read_text())
    assert record["model"] == "trip-planner" and latest_values(record) == {"destination": "Paris"}
    assert record["version"] == 2 and record["snapshots"][-1]["asked"] == ["budget"]


def test_restart_with_the_json_store_resumes_a_half_finished_conversation(start, tmp_path):
    first = start(store=str(tmp_path))
    chat = Chat(first)
    chat.say("destination: Paris\nbudget: 2000")
    first.close()
    chat.server = start(store=str(tmp_path))   # a new server process would read the same directory
    reply = chat.say("a week in mid-October")
    assert "Your trip to Paris" in answer_of(reply)
    assert "a week in mid-October" in answer_of(reply) and "2000" in answer_of(reply)


def test_memory_store_forgets_the_least_recently_used_beyond_its_bound():
    store = cozyopenai.MemoryStore(max_conversations=2)
    for name in ("a", "b", "c"):
        store.save(name, {"n": name})
    assert store.load("a") is None and store.load("c") == {"n": "c"}


def test_memory_store_keeps_a_copy_apart_from_its_callers_and_saves_again_after_a_failed_save():
    store = cozyopenai.MemoryStore()
    record = {"snapshots": [{"values": {"word": "hello"}, "at": 1.5}], "results": {"d": "text"}}
    store.save("a", record)
    record["snapshots"][0]["values"]["word"] = "changed"   # the caller's later change
    loaded = store.load("a")
    assert loaded == {"snapshots": [{"values": {"word": "hello"}, "at": 1.5}], "results": {"d": "text"}}
    loaded["results"]["d"] = "changed too"   # a change to what load gave
    assert store.load("a")["results"] == {"d": "text"}
    with pytest.raises(Exception):
        store.save("a", {"x": [1, lambda: 0]})   # a pickling that fails half-way
    assert store.load("a")["results"] == {"d": "text"}
    store.save("b", {"n": [1]})
    assert store.load("b") == {"n": [1]}


def test_keyed_locks_let_one_thread_at_a_time_hold_a_key_and_keep_no_entry_once_left():
    locks, inside, most = cozyopenai._KeyedLocks(), {"a": 0, "b": 0}, {"a": 0, "b": 0}

    def turns(key):
        for number in range(300):
            with locks(key):
                inside[key] += 1
                most[key] = max(most[key], inside[key])
                if number % 50 == 0:
                    time.sleep(0.001)   # a holder that waits: the others queue behind it
                inside[key] -= 1
    threads = [threading.Thread(target=turns, args=("a",)) for _ in range(4)] + [threading.Thread(target=turns,
                                                                                                  args=("b",))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert most == {"a": 1, "b": 1} and locks._entries == {}   # one holder of a key at a time; nothing kept
    with locks("a"):   # keys apart do not wait for each other
        with locks("b"):
            assert set(locks._entries) == {"a", "b"}


def test_memory_store_forgets_conversations_unused_past_their_age():
    store = cozyopenai.MemoryStore(max_age_seconds=0.05)
    store.save("a" * 32, {"n": 1})
    time.sleep(0.1)
    assert store.load("a" * 32) is None


def test_store_named_json_is_the_json_store_in_its_default_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    store = cozyopenai.open_store("json")
    assert isinstance(store, cozyopenai.JsonFileStore)
    assert (tmp_path / cozyopenai.DEFAULT_STORE).is_dir() and not (tmp_path / "json").exists()


def test_store_memory_and_json_in_any_case_create_no_folder_of_that_name(tmp_path):
    for store in ("Memory", "JSON"):
        with command_line_server("--store", store, "--workflows", WORKFLOWS_PATH, cwd=tmp_path) as server:
            assert requests.get(server.url + "/openai/models", timeout=5).status_code == 200
    assert sorted(os.listdir(tmp_path)) == ["conversations"]   # "JSON" is the default folder


@pytest.mark.parametrize("spec, reason", [
    ("ftp://x/y", "--store ftp://...: unknown scheme; use memory, a folder, or one of file://, redis://"),
    ("", "--store is empty: give memory, a folder, or a redis:// URL"),
    ("redis://127.0.0.1:6379/abc", "the database is a number (redis://host:6379/0), not 'abc'"),
])
def test_a_store_of_an_unknown_scheme_an_empty_name_or_a_redis_database_that_is_no_number_is_refused(
        spec, reason, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(cozyopenai.ConfigError) as refused:
        cozyopenai.open_store(spec)
    assert reason in refused.value.message
    assert os.listdir(tmp_path) == []   # refused before anything was made: no folder of that name


def test_the_command_line_refuses_a_store_of_an_unknown_scheme_with_one_line_and_status_2(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(HERE, "cozyopenai.py"), "--store", "ftp://x/y", "--port",
                             "0"], capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert result.returncode == 2 and "--store ftp://...: unknown scheme" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert os.listdir(tmp_path) == []


def test_a_store_object_is_taken_only_if_it_is_a_cozyopenai_store():
    class LooksLikeAStore:   # every method a store has, but not a subclass of cozyopenai.Store
        def load(self, conversation_id):
            return None

        def save(self, conversation_id, record):
            pass

        def lock(self, conversation_id):
            return contextlib.nullcontext()

        def count(self):
            return 0
    with pytest.raises(cozyopenai.ConfigError, match=r"the store LooksLikeAStore is not a cozyopenai\.Store: .*"
                                                     r"\(subclass cozyopenai\.Store\)"):
        cozyopenai.open_store(LooksLikeAStore())
    store = cozyopenai.MemoryStore()
    assert cozyopenai.open_store(store) is store


def test_conversation_ids_are_well_formed_unique_and_differ_in_a_forked_worker():
    ids = cozyopenai.ConversationIds()
    drawn = [ids() for _ in range(500)]   # more than one pool of random bytes
    assert len(set(drawn)) == 500 and all(cozyopenai.is_conversation_id(i) for i in drawn)
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:   # a worker forked after the pool was drawn must not repeat the parent's ids
        os.write(writer, ids().encode())
        os._exit(0)
    os.waitpid(child, 0)
    assert os.read(reader, 64).decode() != ids()
    os.close(reader), os.close(writer)


def test_a_reply_ending_with_its_own_identifier_block_cleans_as_clean_reply_cleans_it():
    # clean_own_reply cuts off the block a turn wrote instead of searching for it: the two must never differ.
    from hypothesis import given, settings, strategies as st
    info = cozyopenai.ID_BLOCK_INFO
    parts = st.sampled_from(["", " ", "\n", "\r\n", "\t", "x", "`", "```", "<thinking>", "</thinking>", info,
                             "```" + info + "\n", "```" + info + "\nabc", "\n```", "abc"])
    texts = st.lists(parts, max_size=8).map("".join) | st.text(max_size=20)
    ids = cozyopenai.ConversationIds()

    @settings(max_examples=400, deadline=None, database=None, derandomize=True)   # a second or so
    @given(text=texts, tail=texts, ends_with_block=st.booleans())
    def check(text, tail, ends_with_block):
        block = cozyopenai.id_block(ids())
        reply = text + block if ends_with_block else text + tail
        assert cozyopenai.clean_own_reply(reply, block) == cozyopenai.clean_reply(reply)
        assert cozyopenai.clean_own_reply(reply, "") == cozyopenai.clean_reply(reply)
    check()


def test_json_store_locks_each_conversation_on_its_own(tmp_path):
    store = cozyopenai.JsonFileStore(tmp_path)
    ids = [cozyopenai.new_conversation_id() for _ in range(64)]
    all_held = threading.Barrier(len(ids), timeout=10)   # only if no two conversations share a lock
    failures = []

    def hold(conversation_id):
        with store.lock(conversation_id):
            try:
                all_held.wait()
            except threading.BrokenBarrierError:
                failures.append(conversation_id)
    threads = [threading.Thread(target=hold, args=(i,)) for i in ids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert failures == [] and os.listdir(tmp_path / ".locks") == ["conversations.lock"]


def test_json_store_refuses_ids_that_are_not_conversation_ids(tmp_path):
    store = cozyopenai.JsonFileStore(tmp_path / "store")
    with pytest.raises(ValueError):
        store.load("../" + "a" * 29)


def test_an_identifier_with_path_tricks_never_reaches_the_file_system(start, tmp_path):
    store = tmp_path / "store"
    server = start(store=str(store))
    outside = tmp_path / ("A" * 32 + ".json")
    outside.write_text('{"model": "trip-planner", "values": {"destination": "Stolen"}}')
    for trick in ("../" + "A" * 32, "..%2F" + "A" * 29, "A" * 31 + "/", "A" * 32 + "\x00"):
        history = [{"role": "user", "content": "hi"},
                   {"role": "assistant", "content": f"```cozyui-conversation-identifier\n{trick}\n```"},
                   {"role": "user", "content": "budget: 100"}]
        reply = ask(server, "trip-planner", history)
        assert "Stolen" not in reply
    assert outside.read_text().count("Stolen") == 1
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{32}\.json", name) for name in os.listdir(store) if name not in (".locks", ".saving"))


def test_json_store_expires_old_conversations(tmp_path):
    store = cozyopenai.JsonFileStore(tmp_path, max_age_seconds=3600)
    old, new = "o" * 32, "n" * 32
    store.save(old, {"n": 1})
    store.save(new, {"n": 2})
    os.utime(tmp_path / f"{old}.json", (time.time() - 7200, time.time() - 7200))
    assert store.expire() == 1
    assert store.load(old) is None and store.load(new) == {"n": 2}


def test_an_identifier_in_a_user_message_is_not_trusted(start):
    server = start()
    chat = Chat(server)
    planted = chat.say("destination: Paris\nbudget: 2000")
    conversation_id = ID_BLOCK.search(planted).group(1)
    intruder = [{"role": "user", "content": f"```cozyui-conversation-identifier\n{conversation_id}\n```\n"
                                            "travel_dates: May"}]
    reply = ask(server, "trip-planner", intruder)
    assert "Paris" not in answer_of(reply)
    assert ID_BLOCK.search(reply).group(1) != conversation_id


def test_a_conversation_stored_by_the_previous_release_continues(start, tmp_path):
    conversation_id = "A" * 32
    (tmp_path / f"{conversation_id}.json").write_text(json.dumps({
        "id": conversation_id, "model": "trip-planner", "values": {"destination": "Paris", "budget": 2000},
        "asked": ["travel_dates"], "ask_counts": {"travel_dates": 1}, "runs": 0, "turns": 1, "created": 1.0,
        "updated": 1.0, "seen": ["x"], "before": []}))
    history = [{"role": "user", "content": "destination: Paris\nbudget: 2000"},
               {"role": "assistant", "content": "When?\n\n```cozyui-conversation-identifier\n" + conversation_id
                + "\n```"}, {"role": "user", "content": "in May"}]
    reply = ask(start(store=str(tmp_path)), "trip-planner", history)
    assert "Running trip-planner with destination = Paris, budget = 2000, travel dates = May" in reply
    record = json.loads((tmp_path / f"{conversation_id}.json").read_text())
    assert record["version"] == 2 and len(record["snapshots"]) == 2


def test_a_conversation_keeps_its_most_recent_snapshots_only(start):
    server = start()
    chat = Chat(server, "month-calendar")
    for year in range(2000, 2000 + cozyopenai.SNAPSHOTS_KEPT + 5):
        chat.say(f"year: {year}\nmonth: 1")
    conversation_id = ID_BLOCK.search(chat.messages[1]["content"]).group(1)
    record = server.app.config["cozyopenai.service"].store.load(conversation_id)
    assert len(record["snapshots"]) == cozyopenai.SNAPSHOTS_KEPT
    assert latest_values(record) == {"year": 2000 + cozyopenai.SNAPSHOTS_KEPT + 4, "month": 1}
    assert len(record["results"]) <= cozyopenai.SNAPSHOTS_KEPT


def test_two_turns_at_once_on_one_conversation_lose_no_update(start, fake_llm):
    fake_llm.extractions = {"Trip to Paris.": {"destination": "Paris"}, "budget: 2000": {"budget": "2000"},
                            "travel_dates: May": {"travel_dates": "May"}}
    server = start(llm=fake_llm.settings())
    chat = Chat(server)
    chat.say("Trip to Paris.")
    fake_llm.delay_seconds = 0.3          # both turns load the conversation before either saves, unless locked
    threads = [threading.Thread(target=ask, args=(server, "trip-planner", chat.messages + [
        {"role": "user", "content": text}])) for text in ("budget: 2000", "travel_dates: May")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    conversation_id = ID_BLOCK.search(chat.messages[1]["content"]).group(1)
    values = latest_values(server.app.config["cozyopenai.service"].store.load(conversation_id))
    assert values == {"destination": "Paris", "budget": 2000, "travel_dates": "May"}


def test_two_worker_processes_sharing_the_json_store_lose_no_update(tmp_path, fake_llm):
    fake_llm.extractions = {"Trip to Paris.": {"destination": "Paris"}, "budget: 2000": {"budget": "2000"},
                            "travel_dates: May": {"travel_dates": "May"}}
    llm = ["--llm-base-url", fake_llm.url + "/v1", "--llm-model", "fake", "--store", str(tmp_path)]
    with command_line_server(*llm) as first_server, command_line_server(*llm) as second_server:
        first, second = first_server.url, second_server.url
        history = [{"role": "user", "content": "Trip to Paris."}]
        reply = requests.post(first + "/openai/chat/completions", json={"model": "trip-planner", "messages": history},
                              timeout=10).json()["choices"][0]["message"]["content"]
        history.append({"role": "assistant", "content": reply})
        fake_llm.delay_seconds = 0.3
        threads = [threading.Thread(target=requests.post, args=(url + "/openai/chat/completions",), kwargs={
            "json": {"model": "trip-planner", "messages": history + [{"role": "user", "content": text}]},
            "timeout": 20}) for url, text in ((first, "budget: 2000"), (second, "travel_dates: May"))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(20)
    conversation_id = ID_BLOCK.search(reply).group(1)
    values = latest_values(json.loads((tmp_path / f"{conversation_id}.json").read_text()))
    assert values == {"destination": "Paris", "budget": 2000, "travel_dates": "May"}


def test_kill_9_while_saving_leaves_a_store_that_loads_with_every_answered_turn(tmp_path, capsys):
    answered = {}                         # conversation id -> turns the server answered
    counting = threading.Lock()           # four clients count at once
    stop = threading.Event()

    with command_line_server("--store", str(tmp_path)) as server:
        url = server.url

        def client(number):
            session, history = requests.Session(), []
            while not stop.is_set():
                history.append({"role": "user", "content": f"destination: City{number}x{len(history)}"})
                try:
                    reply = session.post(url + "/openai/chat/completions", timeout=5, json={
                        "model": "trip-planner", "messages": history}).json()["choices"][0]["message"]["content"]
                except (requests.RequestException, ValueError):
                    return
                history.append({"role": "assistant", "content": reply})
                conversation_id = ID_BLOCK.search(history[1]["content"]).group(1)
                with counting:
                    answered[conversation_id] = answered.get(conversation_id, 0) + 1
        clients = [threading.Thread(target=client, args=(n,)) for n in range(4)]
        for thread in clients:
            thread.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with counting:
                if sum(answered.values()) >= 60:
                    break
            time.sleep(0.01)
        os.kill(server.process.pid, 9)
        stop.set()
        for thread in clients:
            thread.join(10)
    assert sum(answered.values()) >= 60, "the clients did not get 60 answers within 30 s"
    store = cozyopenai.JsonFileStore(tmp_path)
    for conversation_id, turns in answered.items():
        assert store.load(conversation_id)["turns"] >= turns
    for name in os.listdir(tmp_path):
        if name.endswith(".json"):
            json.loads((tmp_path / name).read_text())     # every file whole
    with capsys.disabled():
        print(f"\n[kill -9] {sum(answered.values())} answered turns over {len(answered)} conversations, all stored")


REDIS_PASSWORD = "redis-pass-8d1f"


@pytest.fixture
def redis_server(tmp_path):
    """A real redis-server of the test's own (the benchmark's RedisProcess), with a password."""
    if not bench.RedisProcess.available():
        pytest.skip("Debian's redis-server or the redis package is not installed (.ci/run installs them)")
    server = bench.RedisProcess(tmp_path, password=REDIS_PASSWORD)
    yield server
    server.stop()


def test_a_conversation_alternates_between_two_instances_on_one_redis(start, redis_server):
    first, second = (start(store=redis_server.url, expire_after_seconds=3600) for _ in range(2))
    messages = []
    for server, text in ((first, "destination: Rome"), (second, "budget: 2000"), (first, "travel dates: May")):
        messages.append({"role": "user", "content": text})
        messages.append({"role": "assistant", "content": ask(server, "trip-planner", messages)})
    assert "Running trip-planner with destination = Rome, budget = 2000, travel dates = May" in messages[-1]["content"]
    conversation_id = ID_BLOCK.search(messages[1]["content"]).group(1)
    record = json.loads(redis_server.client().get("cozyopenai:conversation:" + conversation_id))
    assert latest_values(record)["travel_dates"] == "May"
    assert 3500 < redis_server.client().ttl("cozyopenai:conversation:" + conversation_id) <= 3600   # Redis' expiry


def test_two_turns_at_once_one_per_instance_lose_no_update(start, fake_llm, redis_server):
    fake_llm.extractions = {"Trip to Paris.": {"destination": "Paris"}, "budget: 2000": {"budget": "2000"},
                            "travel_dates: May": {"travel_dates": "May"}}
    servers = [start(store=redis_server.url, llm=fake_llm.settings()) for _ in range(2)]
    chat = Chat(servers[0])
    chat.say("Trip to Paris.")
    fake_llm.delay_seconds = 0.3          # both turns load the conversation before either saves, unless locked
    threads = [threading.Thread(target=ask, args=(server, "trip-planner", chat.messages + [
        {"role": "user", "content": text}])) for server, text in zip(servers, ("budget: 2000", "travel_dates: May"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    conversation_id = ID_BLOCK.search(chat.messages[1]["content"]).group(1)
    values = latest_values(servers[1].app.config["cozyopenai.service"].store.load(conversation_id))
    assert values == {"destination": "Paris", "budget": 2000, "travel_dates": "May"}


@contextlib.contextmanager
def gunicorn_server(*arguments, workers=4):
    """cozyopenai.py --server gunicorn with ``workers`` worker processes, stopped gracefully after."""
    if importlib.util.find_spec("gunicorn") is None:
        pytest.skip("gunicorn is not installed (pip install gunicorn)")
    port = free_port()
    process = subprocess.Popen([sys.executable, os.path.join(HERE, "cozyopenai.py"), "--port", str(port), "--server",
                                "gunicorn", "--workers", str(workers), *arguments], cwd=HERE,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while not _answers(url + "/health"):
            assert time.monotonic() < deadline and process.poll() is None, "gunicorn did not start within 20 s"
            time.sleep(0.05)
        yield url
    finally:
        process.send_signal(signal.SIGINT)   # gunicorn's quick shutdown; its workers may linger for seconds
        try:
            process.wait(0.5)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)   # the master and its workers: a session of their own
            process.wait(10)


def _answers(url):
    with contextlib.suppress(requests.RequestException):
        return requests.get(url, timeout=1).status_code == 200
    return False


def _post_chat(url, messages):
    response = requests.post(url + "/openai/chat/completions", timeout=20,
                             json={"model": "trip-planner", "messages": messages})
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def _all_at_once(calls, seconds=30):
    """Each call in a thread of its own, released together by a barrier; all must end in ``seconds``."""
    barrier, failures = threading.Barrier(len(calls), timeout=10), []

    def run(call):
        try:
            barrier.wait()
            call()
        except BaseException as exc:   # noqa: BLE001 - reported by the test
            failures.append(exc)
    threads = [threading.Thread(target=run, args=(call,), daemon=True) for call in calls]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + seconds
    for thread in threads:
        thread.join(max(0.1, deadline - time.monotonic()))
    assert not any(thread.is_alive() for thread in threads), f"not every request was answered within {seconds} s"
    assert not failures, failures[0]


def _pairs_at_once(urls, fake_llm, pairs=15):
    """``pairs`` conversations that each get the same next request twice at once (a double
    click, a client's retry), and one more that gets two different requests at once."""
    fake_llm.extractions = {"trip to Tromso": {"destination": "Tromso"}, "around $2222": {"budget": 2222},
                            "budget: 2222": {"budget": 2222}, "travel dates: May": {"travel_dates": "May"}}
    fake_llm.question, fake_llm.delay_seconds = "What is your total budget?", 0
    histories = [[{"role": "user", "content": "trip to Tromso"}] for _ in range(pairs + 1)]

    def begin(number):
        histories[number].append({"role": "assistant", "content": _post_chat(urls[number % len(urls)],
                                                                              histories[number])})
    _all_at_once([lambda number=number: begin(number) for number in range(pairs + 1)])
    sends = [(number, histories[number] + [{"role": "user", "content": "around $2222"}])
             for number in range(pairs) for _ in range(2)]
    sends += [(pairs, histories[pairs] + [{"role": "user", "content": text}])
              for text in ("budget: 2222", "travel dates: May")]
    # The first of a pair still reads its message (one call) when its twin arrives: long enough
    # for both to arrive on a loaded machine (at 0.3 s the gunicorn case failed once, with another
    # test suite running beside it).
    fake_llm.delay_seconds = 0.6
    replies = [None] * len(sends)

    def send(index):
        replies[index] = _post_chat(urls[index % len(urls)], sends[index][1])
    _all_at_once([lambda index=index: send(index) for index in range(len(sends))])
    fake_llm.delay_seconds = 0
    ids = [ID_BLOCK.search(history[1]["content"]).group(1) for history in histories]
    return ids, replies


def _counted_once(ids, replies, load, pairs=15):
    for number in range(pairs):
        first, second = replies[2 * number], replies[2 * number + 1]
        assert answer_of(first) == answer_of(second)
        assert "Understood travel dates" not in first + second and "When: around" not in first + second
        assert sum("nothing was read twice" in reply for reply in (first, second)) == 1
        record = load(ids[number])
        assert latest_values(record) == {"destination": "Tromso", "budget": 2222}
        assert not any("travel_dates" in snapshot["values"] for snapshot in record["snapshots"])
    assert latest_values(load(ids[pairs])) == {"destination": "Tromso", "budget": 2222, "travel_dates": "May"}


@pytest.mark.parametrize("store", ["memory", "json", "redis"])
def test_the_same_request_twice_at_once_counts_once_and_two_different_ones_both_count(start, fake_llm, store,
                                                                                   tmp_path, request):
    spec = {"memory": "memory", "json": str(tmp_path), "redis": None}[store]
    if store == "redis":
        spec = request.getfixturevalue("redis_server").url
    # Two instances on Redis; one process for the others (POSIX file locks do not exclude one process
    # from itself: several processes on one JSON store are the gunicorn test's).
    servers = [start(store=spec, llm=fake_llm.settings()) for _ in range(2 if store == "redis" else 1)]
    ids, replies = _pairs_at_once([server.url for server in servers], fake_llm)
    _counted_once(ids, replies, servers[0].app.config["cozyopenai.service"].store.load)


def test_the_same_request_twice_at_once_counts_once_under_gunicorn_with_four_workers(fake_llm, tmp_path):
    llm = ["--llm-base-url", fake_llm.url + "/v1", "--llm-model", "fake", "--store", str(tmp_path)]
    with gunicorn_server(*llm) as url:
        ids, replies = _pairs_at_once([url], fake_llm)
    _counted_once(ids, replies, lambda conversation_id: json.loads((tmp_path / f"{conversation_id}.json").read_text()))


def write_slow_workflows(path):
    """A workflows file whose "echo" sleeps 30 s before it answers: long enough to kill its
    instance in the middle of a run."""
    slow = workflow(nodes=[{"id": "nap", "type": "python", "inputs": {"function": "time:sleep", "0": 30}},
                           {"id": "say", "type": "template", "inputs": {"template": "{word}", "word": {"query": "word"},
                                                                       "after": {"link": "nap"}}},
                           {"id": "answer", "type": "output", "inputs": {"text": {"link": "say"}}}])
    path.write_text(json.dumps({"workflows": [slow]}))


def test_an_instance_killed_mid_turn_frees_its_conversation_for_the_next_turn_elsewhere(start, redis_server, tmp_path):
    write_slow_workflows(tmp_path / "slow.json")
    url = redis_server.url + "?lock_seconds=1"
    messages = [{"role": "user", "content": "hello"}]
    with command_line_server("--store", url, "--workflows", str(tmp_path / "slow.json")) as doomed:
        messages.append({"role": "assistant", "content": server_chat(doomed, "echo", "hello")})
        messages.append({"role": "user", "content": "word: first"})
        def slow_turn():
            with contextlib.suppress(requests.RequestException):   # its server is killed under it
                requests.post(doomed.url + "/openai/chat/completions", timeout=40,
                              json={"model": "echo", "messages": messages})
        threading.Thread(target=slow_turn, daemon=True).start()
        conversation_id = ID_BLOCK.search(messages[1]["content"]).group(1)
        deadline = time.monotonic() + 10
        while not redis_server.client().exists("cozyopenai:lock:" + conversation_id):   # the turn is running
            assert time.monotonic() < deadline, "the turn never took its lock"
            time.sleep(0.02)
        os.kill(doomed.process.pid, 9)
    survivor = start([workflow()], store=url)
    reply = ask(survivor, "echo", messages[:2] + [{"role": "user", "content": "word: second"}])
    assert answer_of(reply) == "You said second."


def test_redis_stopped_and_started_again_keeps_every_answered_turn_and_the_outage_is_a_503(start, redis_server):
    server = start(store=redis_server.url)
    chat = Chat(server)
    chat.say("destination: Rome")
    chat.say("budget: 2000")
    redis_server.stop()
    assert requests.get(server.url + "/health", timeout=10).status_code == 503   # load balancers look elsewhere
    assert requests.get(server.url + "/metrics", timeout=10).status_code == 200  # the counters, without the gauge
    response = server.post({"model": "trip-planner", "messages": chat.messages + [
        {"role": "user", "content": "travel dates: May"}]})
    error = response.json()["error"]
    assert response.status_code == 503 and error["type"] == "server_error"
    assert f"127.0.0.1:{redis_server.port}/0" in error["message"] and REDIS_PASSWORD not in error["message"]
    redis_server.start()   # the same folder: the append-only file brings the conversation back
    assert requests.get(server.url + "/health", timeout=10).json()["status"] == "ok"
    reply = chat.say("travel dates: May")
    assert "Running trip-planner with destination = Rome, budget = 2000, travel dates = May" in reply


def test_a_redis_store_that_cannot_be_reached_at_start_up_is_one_line():
    pytest.importorskip("redis")
    url = f"redis://:hidden-pw@127.0.0.1:{free_port()}/0"
    result = subprocess.run([sys.executable, os.path.join(HERE, "cozyopenai.py"), "--store", url, "--port", "0"],
                            capture_output=True, text=True, timeout=30, cwd=HERE)
    assert result.returncode == 2 and "cannot reach Redis" in result.stderr and "hidden-pw" not in result.stderr
    assert "Traceback" not in result.stderr


def test_a_store_that_cannot_lock_is_refused_at_start_up():
    class Forgetful:
        def load(self, conversation_id):
            return None

        def save(self, conversation_id, record):
            pass
    with pytest.raises(cozyopenai.ConfigError, match="has no lock"):
        cozyopenai.make_app(WORKFLOWS_PATH, store=Forgetful())


####################################################################################
# Reading: the language tables
####################################################################################

def test_every_shipped_language_passes_its_check_and_an_entry_no_message_can_match_is_refused():
    # A message's words are compared folded (lower case, no accents, no apostrophes): an entry
    # that is not, or a month list that is not twelve, stops the module from loading.
    assert all(cozyopenai.check_language(language) is language for language in cozyopenai.LANGUAGES.values())
    english = cozyopenai.ENGLISH
    for broken, reason in ((dataclasses.replace(english, negations="not Never"),
                            "language en, negations: 'Never' can never match a message's words"),
                           (dataclasses.replace(english, stays="i'm"),
                            "language en, stays: \"i'm\" can never match a message's words (write it folded: 'im')"),
                           (dataclasses.replace(english, months=english.months[:11]),
                            "language en: 'months' lists 11 months, not 12")):
        with pytest.raises(ValueError, match=re.escape(reason)):
            cozyopenai.check_language(broken)


def test_each_language_writes_every_sentence_with_its_fields_and_a_table_that_does_not_is_refused():
    for language in cozyopenai.LANGUAGES.values():
        assert set(language.writes) == set(cozyopenai.WRITTEN_SENTENCES), language.code
    english = cozyopenai.ENGLISH
    without_which = {key: text for key, text in english.writes.items() if key != "which"}
    for writes, reason in ((without_which, "language en, writes: 'which' must be a text with the fields label, values"),
                           ({**english.writes, "which": "Which {input}?"}, "'which' must be a text with the fields"),
                           ({**english.writes, "thanks": "Thanks!"}, "language en, writes: unknown sentences ['thanks']")):
        with pytest.raises(ValueError, match=re.escape(reason)):
            cozyopenai.check_language(dataclasses.replace(english, writes=writes))
    # A table that writes nothing is allowed: its speakers are answered in English.
    assert cozyopenai.check_language(dataclasses.replace(english, code="br", writes={})).writes == {}


def test_month_names_in_each_language_give_the_months_number():
    for words, month in ((("october", "oct", "octobre", "oktober", "octubre", "ottobre", "outubro"), 10),
                         (("may", "mai", "mayo", "maggio", "maio"), 5), (("march", "mars", "marz", "marzo"), 3)):
        assert {cozyopenai.MONTHS[word] for word in words} == {month}, words
    assert sorted(set(cozyopenai.MONTHS.values())) == list(range(1, 13))


def test_every_language_has_the_same_fields_and_each_reading_field_some_words():
    # Each language is data of one shape; a field the reader uses is never empty in English.
    fields = {spec.name for spec in dataclasses.fields(cozyopenai.Language)}
    for language in cozyopenai.LANGUAGES.values():
        assert {spec.name for spec in dataclasses.fields(language)} == fields
        assert len(language.months) == 12 and language.negations and language.place_leads, language.code
    english_leaves_empty = {"code", "relatives", "greetings", "month_compounds", "travel_heads"}
    assert all(getattr(cozyopenai.ENGLISH, name) for name in fields - english_leaves_empty)


def test_a_new_language_is_one_table_the_module_checks():
    # Adding a language is adding a table: a clean one passes, with its words where the reader looks.
    breton = dataclasses.replace(cozyopenai.ENGLISH, code="br", negations="ne ket", place_leads="da")
    assert cozyopenai.check_language(breton) is breton
    with pytest.raises(ValueError, match="language br, place_leads: 'Da'"):
        cozyopenai.check_language(dataclasses.replace(breton, place_leads="Da"))


def test_the_readers_logic_names_no_word_of_any_language():
    # The sections after the tables may quote internal names (token shapes, kinds, JSON keys)
    # but never a word a user writes: those come from the tables alone.
    source = open(os.path.join(HERE, "cozyopenai.py"), encoding="utf-8").read()
    start = source.index("# Reading: words, numbers and typed values")
    end = source.index("# Questions: asking for what is missing")
    tree = ast.parse(source)
    internal = (set(cozyopenai.VALUE_TYPES) | set(cozyopenai.TEXT_KINDS) | set(cozyopenai.NUMBER_KINDS)
                | set(cozyopenai.INTENTS) | set(cozyopenai.TOKEN_PATTERN.groupindex)
                | {spec.name for spec in dataclasses.fields(cozyopenai.Language)}
                | {"anchor", "glue", "text", "number", "name", "values", "intent", "question", "type", "role",
                   "content", "system", "user", "assistant", "object", "properties", "required", "enum", "null",
                   "additionalProperties", "before", "after", "unit", "sign", "kind", "mM", "kK", "NFKD", "value"})
    first_line = source[:start].count("\n") + 1
    last_line = source[:end].count("\n") + 1
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.body
                  and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    quoted = {node.value for node in ast.walk(tree)
              if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
              and first_line <= node.lineno <= last_line and re.fullmatch(r"[^\W\d_]{2,}", node.value)}
    assert quoted - internal == set()
    assert not (quoted - internal) & cozyopenai.ALL_WORDS


####################################################################################
# Reading: words, numbers and typed values
####################################################################################

@pytest.mark.parametrize("written, number", [
    ("2,000", 2000), ("2.000,50", 2000.5), ("2,000.50", 2000.5), ("2,5", 2.5), ("2.000", 2000), ("1'000", 1000),
    ("1 500", 1500), ("2k", 2000), ("1.5m", 1_500_000), ("-3", -3),
])
def test_a_number_is_read_with_either_decimal_mark_its_thousands_separators_and_a_k_or_m(written, number):
    assert cozyopenai.parse_number(written) == number


def test_numbers_in_a_text_are_each_number_it_states_and_spaced_thousands_only_when_asked():
    assert cozyopenai.numbers_in("between 2,000 and 3.5k") == [2000, 3500]
    assert cozyopenai.numbers_in("a 3 day trip for 2") == [3, 2]
    assert cozyopenai.numbers_in("nothing to count") == []
    assert cozyopenai.numbers_in("1 500 euros") == [1, 500]   # two numbers, unless French spacing is asked for
    assert 1500 in cozyopenai.numbers_in("1 500 euros", spaced=True)
    with pytest.raises(ValueError):
        cozyopenai.parse_number("lots")


def test_an_inputs_kind_comes_from_its_type_or_the_words_of_its_name_and_description():
    workflows = cozyopenai.load_workflows(WORKFLOWS_PATH)
    trip, calendar = workflows["trip-planner"].query_inputs, workflows["month-calendar"].query_inputs
    assert {name: cozyopenai.input_kind(query) for name, query in trip.items()} == {
        "destination": "place", "budget": "money", "travel_dates": "date", "pace": "choice", "children": "boolean"}
    assert cozyopenai.input_kind(calendar["year"]) == "year" and cozyopenai.input_kind(calendar["month"]) == "month"
    assert cozyopenai.input_kind(cozyopenai.QueryInput("contact", "Where we send the summary, by email.")) == "email"
    assert cozyopenai.input_kind(cozyopenai.QueryInput("topic", "What the talk is about.")) == "text"
    assert cozyopenai.input_kind(cozyopenai.QueryInput("guests", "How many come.", type="integer")) == "number"


def test_a_month_is_read_by_its_name_in_any_language_but_not_beside_a_day_nor_past_its_bound():
    month = cozyopenai.load_workflows(WORKFLOWS_PATH)["month-calendar"].query_inputs["month"]
    assert [cozyopenai.coerce_value(month, raw) for raw in ("March", "märz", "mars", "10", 7)] == [3, 3, 3, 10, 7]
    with pytest.raises(ValueError, match="I need the month alone, not 'May 3'"):
        cozyopenai.coerce_value(month, "May 3")
    with pytest.raises(ValueError, match="the month must be at most 12, not 13"):
        cozyopenai.coerce_value(month, 13)


@pytest.mark.parametrize("value_type, raw, expected", [
    ("number", "$2,000", 2000), ("number", "2.000,50 €", 2000.5), ("number", "2k", 2000),
    ("number", "1,5", 1.5), ("integer", "12", 12), ("boolean", "yes", True), ("boolean", "false", False),
    ("boolean", "Nein", False), ("boolean", "oui", True), ("string", "  Paris ", "Paris"),
])
def test_values_are_coerced_to_their_declared_type(value_type, raw, expected):
    query = cozyopenai.QueryInput("x", "An input.", type=value_type)
    assert cozyopenai.coerce_value(query, raw) == expected


@pytest.mark.parametrize("value_type, raw", [
    ("number", "about 1500-2000"), ("integer", "2.5"), ("boolean", "maybe"), ("number", "lots"),
    ("number", True), ("number", 1e308), ("number", "99999999999999999999"), ("number", float("nan")),
])
def test_values_that_do_not_fit_their_type_are_rejected_with_a_reason(value_type, raw):
    query = cozyopenai.QueryInput("budget", "An input.", type=value_type)
    with pytest.raises(ValueError, match="the budget"):
        cozyopenai.coerce_value(query, raw)


def test_choices_match_case_insensitively_or_by_a_clear_prefix():
    query = cozyopenai.QueryInput("pace", "Pace.", type="choice", choices=("relaxed", "balanced", "packed"))
    assert cozyopenai.coerce_value(query, "RELAXED") == "relaxed"
    assert cozyopenai.coerce_value(query, "bal") == "balanced"
    with pytest.raises(ValueError, match="must be one of relaxed, balanced, packed"):
        cozyopenai.coerce_value(query, "pa")


def test_choice_synonyms_and_languages_are_understood(start, fake_llm):
    message = "Drei Tage in München im Mai, bitte entspannt."
    fake_llm.extractions = {message: {"destination": "München", "travel_dates": "Drei Tage im Mai",
                                      "pace": "entspannt"}}
    reply = Chat(start(llm=fake_llm.settings())).say(message)
    assert "Understood pace: relaxed." in thinking_of(reply)
    assert "Understood destination: München." in thinking_of(reply)


def test_out_of_range_numbers_are_rejected_with_the_bound(start):
    reply = Chat(start(), "month-calendar").say("year: 2026\nmonth: 13")
    assert answer_of(reply) == ("Got it: year 2026. The month must be at most 12, not 13. "
                                "Which month (its name, or a number from 1 to 12)?")


def test_a_number_can_be_named_by_its_synonyms(start, fake_llm):
    chat = Chat(start(), "month-calendar")
    chat.say("year: 2027")
    assert "March 2027" in answer_of(chat.say("March"))   # offline: the answer to "Which month?"
    fake_llm.extractions = {"Kalender für März 2027": {"year": 2027, "month": "März"}}
    reply = Chat(start(llm=fake_llm.settings()), "month-calendar").say("Kalender für März 2027")
    assert "März 2027" in answer_of(reply) or "March 2027" in answer_of(reply)


def test_a_number_synonym_is_stated_only_as_written_or_as_the_answer(start, fake_llm):
    fake_llm.extractions = {"I may want 2026, what does it look like?": {"year": 2026, "month": 5}}
    reply = Chat(start(llm=fake_llm.settings()), "month-calendar").say("I may want 2026, what does it look like?")
    assert "Ignored month = 5" in reply
    chat = Chat(start(), "month-calendar")
    chat.say("year: 2026")
    assert "I need the month alone, not 'May 3'" in answer_of(chat.say("May 3"))
    assert "May 2026" in answer_of(chat.say("may"))   # lower case is fine as the answer to "Which month?"


def test_a_lone_surrogate_in_a_message_is_dropped_from_the_value_not_a_500(start):
    server = start([workflow()])
    body = '{"model": "echo", "messages": [{"role": "user", "content": "word: caf\\ud800e"}]}'
    response = requests.post(server.url + "/openai/chat/completions", data=body.encode(), timeout=10,
                             headers={"Content-Type": "application/json"})
    assert response.status_code == 200
    assert "You said cafe." in response.json()["choices"][0]["message"]["content"]


####################################################################################
# Reading: typed spans of a message
####################################################################################

def test_a_message_is_tokens_with_a_shape_and_folded_text_each_where_it_was_written():
    text = "Zürich on 2026-05-01 or 3/5/2026, the 3rd: 1,500 isn't it? Am 3. Mai"
    tokens = cozyopenai.tokenize(text)
    assert [(token.text, token.shape) for token in tokens] == [
        ("Zürich", "word"), ("on", "word"), ("2026-05-01", "iso"), ("or", "word"), ("3/5/2026", "dmy"),
        (",", "mark"), ("the", "word"), ("3rd", "ordinal"), (":", "mark"), ("1,500", "number"), ("isn't", "word"),
        ("it", "word"), ("?", "mark"), ("Am", "word"), ("3.", "ordinal"), ("Mai", "word")]
    assert [token.folded for token in tokens if token.shape == "word"] == [
        "zurich", "on", "or", "the", "isnt", "it", "am", "mai"]
    assert all(text[token.start:token.end] == token.text for token in tokens)
    assert tokens[0].capitalised and not tokens[1].capitalised and not tokens[7].capitalised


@pytest.mark.parametrize("text, amount", [
    ("1 500 €", 1500), ("$5000", 5000), ("3000 dólares", 3000), ("2.000 Euro", 2000), ("2k", 2000),
    ("USD 1,200.50", 1200.5), ("€1.200", 1200),
])
def test_an_amount_with_its_currency_before_or_after_it_is_one_money_span(text, amount):
    tokens = cozyopenai.tokenize(text)
    (span,) = cozyopenai.money_spans(text, tokens)
    assert (span.holds, span.value, span.negated) == ("money", amount, False)
    assert (span.start, span.end) == (0, len(tokens))   # the currency is part of it


@pytest.mark.parametrize("text", ["1500-2000 euros", "between 1500 and 2000 €", "1500 or 2000 euros",
                                  "budget 2000", "in 2026"])
def test_a_range_or_a_number_without_a_currency_is_no_money_span(text):
    assert cozyopenai.money_spans(text, cozyopenai.tokenize(text)) == []


@pytest.mark.parametrize("text, period", [
    ("from 10 to 17 October", "from 10 to 17 October"), ("a week in mid-October", "a week in mid-October"),
    ("Let's go in April", "April"), ("im Juli", "Juli"), ("del 3 al 10 de junio", "del 3 al 10 de junio"),
    ("2026-05-01 to 2026-05-08", "2026-05-01 to 2026-05-08"), ("10-17 October", "10-17 October"),
])
def test_a_period_is_one_date_span_in_the_users_words_without_the_word_leading_into_it_but_a_ranges_opener(
        text, period):
    tokens = cozyopenai.tokenize(text)
    (span,) = cozyopenai.period_spans(tokens)
    assert span.holds == "date" and not span.negated
    assert text[tokens[span.start].start:tokens[span.end - 1].end] == period


@pytest.mark.parametrize("text", ["May I ask something?", "I may go", "the fall of Rome", "see ticket 1.2.3 on 10.0.0.1"])
def test_a_month_word_used_otherwise_a_version_or_an_address_is_no_period(text):
    assert cozyopenai.period_spans(cozyopenai.tokenize(text)) == []


def test_a_capitalised_name_after_a_place_word_is_a_name_span_and_a_ruled_out_one_is_negated(trip_planner):
    taken = cozyopenai.words_taken(trip_planner)

    def names(text):
        return [(span.value, span.negated)
                for span in cozyopenai.name_spans(cozyopenai.tokenize(text), cozyopenai.PLACE_LEADS, taken)]
    assert names("A trip to New York in May") == [("New York", False)]
    assert names("nach Frankfurt am Main") == [("Frankfurt am Main", False)]
    assert names("not Paris") == [("Paris", True)]
    assert names("Not Paris — Lyon") == [("Paris", True), ("Lyon", False)]
    assert names("Pas Nice, plutôt Cannes") == [("Nice", True), ("Cannes", False)]
    assert names("to Rome, actually no, to Milan") == [("Rome", True), ("Milan", False)]
    assert names("I'm in London and want to go to Rome") == [("Rome", False)]   # where one is, not where to go
    assert names("Paris is nice") == []                                         # no place word leads to it


@pytest.mark.parametrize("text, word, negated", [
    ("not Paris", "Paris", True), ("Not relaxed, packed please", "relaxed", True),
    ("Not relaxed, packed please", "packed", False), ("anywhere but Paris", "Paris", True),
    ("no children", "children", True), ("sans enfants", "enfants", True), ("ohne Kinder", "Kinder", True),
    ("not Paris but Lyon", "Lyon", False), ("Paris, not Lyon", "Paris", False),
])
def test_a_word_is_negated_by_a_negation_before_it_in_its_clause_until_a_contrast(text, word, negated):
    tokens = cozyopenai.tokenize(text)
    (index,) = [index for index, token in enumerate(tokens) if token.text == word]
    assert cozyopenai.is_negated(tokens, index) is negated


####################################################################################
# Reading: the floor (no LLM) and the LLM on top of it
####################################################################################

def test_a_new_servers_first_message_compiles_no_pattern_the_reader_made_at_start_up():
    # The reader compiles its patterns for a workflow's labels on the first message that needs
    # them (about 90 ms): make_app reads a message per workflow, so that no user waits for them.
    # A fresh interpreter, since the patterns, once compiled, are cached for the process.
    probe = """if True:
        import io, json, re, sys, cozyopenai
        app = cozyopenai.make_app("workflows.json", store="memory")
        def call(method, path, body=b""):
            environ = {"REQUEST_METHOD": method, "PATH_INFO": path, "CONTENT_TYPE": "application/json",
                       "CONTENT_LENGTH": str(len(body)), "wsgi.input": io.BytesIO(body), "SERVER_NAME": "x",
                       "SERVER_PORT": "80", "wsgi.url_scheme": "http", "SERVER_PROTOCOL": "HTTP/1.1",
                       "wsgi.errors": sys.stderr, "REMOTE_ADDR": "127.0.0.1"}
            return b"".join(app(environ, lambda *a: None))
        call("GET", "/health")   # Bottle's own router is compiled on its first request
        compiled, original = [], re._compiler.compile
        re._compiler.compile = lambda pattern, *rest: compiled.append(str(pattern)[:60]) or original(pattern, *rest)
        reply = json.loads(call("POST", "/openai/chat/completions", json.dumps(
            {"model": "trip-planner", "messages": [{"role": "user", "content": sys.argv[1]}]}).encode()))
        print(json.dumps([compiled, reply["choices"][0]["message"]["content"]]))"""
    run = subprocess.run([sys.executable, "-c", probe, "I want to plan a trip to Paris."], cwd=HERE, capture_output=True,
                         text=True, timeout=30)
    compiled, answer = json.loads(run.stdout)
    assert "Paris" in answer and compiled == [], (compiled, run.stderr[-500:])


def test_the_floor_reads_an_amount_a_period_and_a_place_from_plain_sentences(trip_planner):
    extraction, reading = cozyopenai.read_floor(trip_planner, new_conversation(),
                                                "My budget is 1 500 €, from 10 to 17 October")
    assert extraction.values == {"budget": 1500, "travel_dates": "from 10 to 17 October"} and extraction.rejected == {}
    assert [token.text for token in reading.tokens][:3] == ["My", "budget", "is"]
    assert cozyopenai.extract_offline(trip_planner, new_conversation(), "Trip to Oslo with the children, 2k euros"
                                      ).values == {"destination": "Oslo", "budget": 2000, "children": True}


def test_the_floor_never_takes_a_value_the_message_rules_out(trip_planner):
    extraction, reading = cozyopenai.read_floor(trip_planner, new_conversation(), "Anywhere but Paris, budget 2000.")
    assert extraction.values == {"budget": 2000} and reading.ruled_out["destination"] == ["Paris"]
    extraction, reading = cozyopenai.read_floor(trip_planner, new_conversation(), "not relaxed, packed please")
    assert extraction.values == {"pace": "packed"} and reading.ruled_out["pace"] == ["relaxed"]


def test_the_floor_reads_name_value_lines_and_says_why_a_value_does_not_fit(trip_planner):
    lines = cozyopenai.extract_offline(trip_planner, new_conversation(),
                                       "destination: Lisbon\nbudget: 1500\ntravel dates: May")
    assert lines.values == {"destination": "Lisbon", "budget": 1500, "travel_dates": "May"}
    unfit = cozyopenai.extract_offline(trip_planner, new_conversation(), "budget: lots")
    assert unfit.values == {} and unfit.rejected == {"budget": "I need a single number for the budget, not 'lots'"}


def test_the_floor_gives_a_bare_answer_to_the_input_asked_for_or_to_the_one_other_input_it_fits(trip_planner):
    asked = lambda name: new_conversation(asked=[name])   # noqa: E731
    assert cozyopenai.extract_offline(trip_planner, asked("destination"), "Paris").values == {"destination": "Paris"}
    assert cozyopenai.extract_offline(trip_planner, asked("budget"), "2000").values == {"budget": 2000}
    assert cozyopenai.extract_offline(trip_planner, asked("travel_dates"), "2000").values == {"budget": 2000}
    assert cozyopenai.extract_offline(trip_planner, new_conversation(), "2000").values == {}   # a number alone


def test_the_floor_takes_a_whole_message_of_cancelling_as_the_cancel_intent(trip_planner):
    for text in ("cancel", "Start over!", "annuler"):
        extraction = cozyopenai.extract_offline(trip_planner, new_conversation(), text)
        assert (extraction.intent, extraction.values) == ("cancel", {}), text
    going_on = cozyopenai.extract_offline(trip_planner, new_conversation(), "cancel the museum, destination: Rome")
    assert (going_on.intent, going_on.values) == ("provide", {"destination": "Rome"})


def test_offline_the_document_dialogue_completes_in_at_most_four_user_turns(start):
    chat = Chat(start())
    first = chat.say("I want to plan a trip to Paris.")   # "trip to" is a cue of the destination
    assert answer_of(first).startswith("Got it: destination Paris. I still need the budget and travel dates.")
    assert "When would you like to travel" in chat.say("around $2000")
    plan = answer_of(chat.say("a week in mid-October"))
    assert "## Your trip to Paris" in plan and "a week in mid-October" in plan and "2000" in plan
    assert len([m for m in chat.messages if m["role"] == "user"]) == 3


def test_offline_a_cue_takes_only_a_capitalised_name_and_not_two_different_ones(start):
    assert "Understood destination: New York." in Chat(start()).say("A trip to New York in May, please")
    assert "Understood destination" not in Chat(start()).say("I'd like to go to the beach")
    assert "Understood destination" not in Chat(start()).say("Fly to Rome, then go to Paris")
    for message in ("How about I tell you later", "What about June?", "What about Budget 3000",
                    "Do it for Two Weeks", "Make it Sept"):
        assert "Understood destination" not in Chat(start()).say(message), message
    chat = Chat(start())
    chat.say("destination: Rome\nbudget: 2000\ntravel dates: May")
    reply = chat.say("Make it Relaxed")   # a pace, not a place
    assert "Changed destination" not in reply and "pace = relaxed" in reply


def test_offline_a_reply_about_other_inputs_fills_those_and_asks_again_for_the_asked_one(start):
    chat = Chat(start())
    chat.say("I want to plan a trip.")
    reply = chat.say("My budget is around $2000, and I'd like to go for a week in mid-October.")
    assert "Understood budget: 2000." in thinking_of(reply)
    assert "Understood travel dates: a week in mid-October." in thinking_of(reply)
    assert "Understood destination" not in thinking_of(reply)
    assert "Where would you like to go?" in answer_of(reply)


def test_offline_choices_named_exactly_and_iso_dates_are_read_without_labels(start):
    nodes = [{"id": "say", "type": "template", "inputs": {"template": "{day} {kind}", "day": {"query": "day"},
                                                          "kind": {"query": "kind"}}},
             {"id": "answer", "type": "output", "inputs": {"text": {"link": "say"}}}]
    queries = {"day": {"description": "The date of the event.", "type": "string"},
               "kind": {"description": "Kind of event.", "type": "choice", "choices": ["party", "meeting"]}}
    reply = Chat(start([workflow(nodes=nodes, query_inputs=queries)]), "echo").say(
        "A meeting on 2026-12-01 please")
    assert answer_of(reply) == "2026-12-01 meeting"


def test_offline_a_short_phrase_after_a_label_is_read_and_a_word_of_a_label_names_its_input(start):
    chat = Chat(start())
    reply = chat.say("destination Paris, budget 2000")
    assert "Understood destination: Paris." in reply and "Understood budget: 2000." in reply
    assert "Understood travel dates: 3 to 7 June." in chat.say("dates: 3 to 7 June")


def test_offline_a_label_talked_about_is_not_a_value(start):
    server = start()
    for message in ("I need a destination with beaches and a budget for two", "the destination doesn't matter much",
                    "What a destination really", "budget as low as possible, destination as cheap as possible"):
        assert "Understood" not in thinking_of(Chat(server).say(message)), message
    assert "Understood destination: St. Louis." in Chat(server).say("My destination: St. Louis")


def test_offline_typed_values_go_only_to_inputs_that_name_the_kind_as_a_word(start):
    nodes = [{"id": "say", "type": "template", "inputs": {"template": "{area} {site}", "area": {"query": "area"},
                                                          "site": {"query": "site"}}},
             {"id": "answer", "type": "output", "inputs": {"text": {"link": "say"}}}]
    queries = {"area": {"description": "The candidate we hire, or a curly-haired mascot.", "type": "string"},
               "site": {"description": "The web page, as a URL, and its update date.", "type": "string"}}
    reply = Chat(start([workflow(nodes=nodes, query_inputs=queries)]), "echo").say("see https://example.org/x")
    assert "Understood site: https://example.org/x." in reply and "Understood area" not in reply


@pytest.mark.parametrize("message, values", [
    ("I want to go to Barcelona, not to Valencia", {"destination": "Barcelona"}),
    ("Je vais à Lyon, pas à Nice", {"destination": "Lyon"}),
    ("kids: no", {"children": False}),
    ("Kinder: nein", {"children": False}),
    ("I'm in London and want to go somewhere warm in May", {"travel_dates": "May"}),
    ("see ticket 1.2.3 on 10.0.0.1", {}),
])
def test_the_floor_keeps_only_the_values_stated_in_sentences_it_once_misread(message, values):
    workflow = cozyopenai.load_workflows(WORKFLOWS_PATH)["trip-planner"]
    extraction = cozyopenai.extract_offline(workflow, cozyopenai.Conversation(id="x" * 32, model="trip-planner"),
                                            message)
    assert extraction.values == values


@pytest.mark.parametrize("reply", ["Add Details", "More Concise", "Tell me more", "hmm, let me think"])
def test_a_regenerate_button_or_a_filler_on_a_question_is_not_taken_for_the_value(start, reply):
    chat = Chat(start())
    chat.say("destination: Rome\nbudget: 2000")   # asks when
    answer = answer_of(chat.say(reply))
    assert answer.startswith(f'I could not read the travel dates from "{reply}".'), answer
    chat = Chat(start())
    chat.say("I want to plan a trip")              # asks where
    assert answer_of(chat.say(reply)).startswith(f'I could not read the destination from "{reply}".')
    assert "Understood destination: lisbon." in chat.say("lisbon")   # a plain answer still is one


def test_the_document_dialogue_with_an_llm_runs_after_two_turns(start, fake_llm):
    fake_llm.extractions = {
        "I want to plan a trip to Paris.": {"destination": "Paris"},
        "My budget is around $2000, and I'd like to go for a week in mid-October.":
            {"budget": "$2000", "travel_dates": "a week in mid-October"},
    }
    chat = Chat(start(llm=fake_llm.settings()), stream=True)
    first = chat.say("I want to plan a trip to Paris.")
    assert answer_of(first) == fake_llm.question
    assert "Understood destination: Paris." in thinking_of(first)
    second = chat.say("My budget is around $2000, and I'd like to go for a week in mid-October.")
    assert answer_of(second) == "".join(fake_llm.node_tokens)
    assert "Running trip-planner with destination = Paris, budget = 2000, travel dates = a week in mid-October" \
        in thinking_of(second)
    brief = fake_llm.calls_of("node")[0]["messages"][-1]["content"]
    assert "Plan a trip to Paris for a week in mid-October, with a total budget of 2000." in brief


def test_extraction_call_holds_the_workflow_input_and_node_descriptions(start, fake_llm):
    Chat(start(llm=fake_llm.settings())).say("I want to plan a trip to Paris.")
    call = fake_llm.calls_of("extraction")[0]
    system = call["messages"][0]["content"]
    workflows = cozyopenai.load_workflows(WORKFLOWS_PATH)
    trip = workflows["trip-planner"]
    assert trip.description in system
    for query in trip.query_inputs.values():
        assert query.description in system
    assert "Writes the planning brief from the gathered inputs." in system
    assert call["messages"][-1] == {"role": "user", "content": "I want to plan a trip to Paris."}
    assert call["response_format"]["type"] == "json_schema"
    assert call["max_tokens"] == cozyopenai.EXTRACTION_MAX_TOKENS   # a looping small model stops there


def test_old_user_messages_are_never_extracted_again(start, fake_llm):
    fake_llm.extractions = {"I want to plan a trip to Paris.": {"destination": "Paris"}}
    chat = Chat(start(llm=fake_llm.settings()))
    chat.say("I want to plan a trip to Paris.")
    chat.say("My budget is 2000 euros.")
    second = fake_llm.calls_of("extraction")[1]["messages"]
    assert second[-1] == {"role": "user", "content": "My budget is 2000 euros."}
    assert all(m["role"] == "system" for m in second[:-1])
    assert "I want to plan a trip to Paris." not in second[-1]["content"]


def test_a_value_the_llm_read_is_used_as_the_message_spells_it(start, fake_llm):
    message = "I want to go to Paris for a week in mid-October"
    fake_llm.extractions = {message: {"destination": "paris", "travel_dates": "A WEEK IN MID-OCTOBER"}}
    reply = Chat(start(llm=fake_llm.settings()), "trip-planner").say(message)
    assert "Understood destination: Paris." in reply and "Understood travel dates: a week in mid-October." in reply
    assert "paris" not in reply and "MID-OCTOBER" not in reply


def test_values_the_user_never_said_are_dropped_and_reported(start, fake_llm):
    fake_llm.invent = {"destination": "Rome", "budget": 5000, "travel_dates": "next summer", "pace": "packed"}
    chat = Chat(start(llm=fake_llm.settings()))
    reply = chat.say("I want to plan a trip.")
    thinking = thinking_of(reply)
    for name in ("destination = 'Rome'", "budget = 5000", "travel dates = 'next summer'", "pace = 'packed'"):
        assert f"Ignored {name}: your message does not say it." in thinking
    assert "Running" not in thinking
    record = chat.server.app.config["cozyopenai.service"].store.load(ID_BLOCK.search(reply).group(1))
    assert latest_values(record) == {}


def test_an_llm_failure_falls_back_to_the_simple_reader_with_a_note(start, fake_llm):
    chat = Chat(start(llm=fake_llm.settings()))
    fake_llm.fail_next = [500, 500, 500, 500]
    reply = chat.say("destination: Paris")
    assert "Reading your message with the language model failed" in thinking_of(reply)
    assert "Understood destination: Paris." in thinking_of(reply)
    assert "What is your total budget for the trip?" in answer_of(reply)


@pytest.mark.parametrize("message, proposed, expected, absent", [
    ("Anywhere but Paris, budget 2000.", {"destination": "Paris", "budget": 2000}, "Understood budget: 2000.",
     "Understood destination"),
    ("No children this time, just the two of us to Vienna.", {"children": True, "destination": "Vienna"},
     "Understood children: no.", "Understood children: yes"),
    ("Not relaxed, packed please. Trip to Oslo.", {"pace": "relaxed", "destination": "Oslo"},
     "Understood pace: packed.", "Understood pace: relaxed"),
    ("Sydney or Melbourne in November, not sure which.", {"destination": "Sydney", "travel_dates": "November"},
     "Your message names several values for the destination (Sydney or Melbourne): asking which.",
     "Understood destination"),
])
def test_a_value_the_message_negates_or_leaves_open_is_never_accepted(start, fake_llm, message, proposed,
                                                                       expected, absent):
    fake_llm.extractions = {message: proposed}
    reply = Chat(start(llm=fake_llm.settings())).say(message)
    assert expected in reply and absent not in reply
    assert "Ignored" in thinking_of(reply)   # the LLM's reading is shown, with why it was dropped


def test_a_synonym_offered_among_alternatives_is_asked_about_not_a_crash(start, fake_llm):
    message = "Trip to Paris, budget 2000 in May, calm or packed, not sure"
    fake_llm.extractions = {message: {"pace": "calm"}}
    reply = Chat(start(llm=fake_llm.settings())).say(message)
    assert "Sorry" not in reply and "Understood pace" not in reply


def test_an_llm_that_invents_never_hides_what_the_user_wrote_plainly(start, fake_llm):
    fake_llm.mode = "inventing"   # every extraction proposes INVENTED values, whatever the message
    chat = Chat(start(llm=fake_llm.settings()))
    first = chat.say("budget: 1500\ndestination: Lisbon")
    assert "Understood budget: 1500." in first and "Understood destination: Lisbon." in first
    assert "Ignored budget = 7777: your message does not say it." in thinking_of(first)
    assert "Understood travel dates" not in first
    reply = chat.say("next spring")   # a bare answer to "when?", which is also what the LLM invents
    assert "Running trip-planner with budget = 1500, destination = Lisbon, travel dates = next spring" in reply
    assert "Reykjavik" not in answer_of(reply) and "7777" not in answer_of(reply)


def test_bare_answers_to_a_question_for_several_inputs_go_where_they_can_only_go(start, fake_llm):
    chat = Chat(start(llm=fake_llm.settings()))   # the LLM asks for every missing input at once, reads nothing
    chat.say("Plan a trip for me.")
    assert "Understood destination: Tokyo." in chat.say("Tokyo")
    assert "Understood budget: 5000." in chat.say("5000")
    assert "Running trip-planner with destination = Tokyo, budget = 5000, travel dates = cherry blossom season" \
        in chat.say("cherry blossom season")


def test_a_place_proposed_with_dates_in_it_is_not_taken(start, fake_llm):
    message = "Vamos a Oporto del 1 al 4 de junio."
    fake_llm.extractions = {message: {"destination": "Oporto del 1 al 4 de junio"}}   # as gemma3-270m answered
    reply = Chat(start(llm=fake_llm.settings())).say(message)
    assert "Understood destination: Oporto." in reply and "Understood travel dates: del 1 al 4 de junio." in reply
    assert "Ignored destination = 'Oporto del 1 al 4 de junio': that is not a place for the destination." in reply


def test_where_the_floor_and_the_llm_disagree_the_message_decides_and_the_thinking_says_so(start, fake_llm):
    message = "budget: 1500, and we might spend 2000 on flights"
    fake_llm.extractions = {message: {"budget": 2000}}
    reply = Chat(start(llm=fake_llm.settings())).say(message)
    assert "Understood budget: 1500." in reply
    assert "Kept the budget '1500' as your message states it; the language model read '2000'." in reply


@pytest.fixture(scope="module")
def offline_scores():
    return bench.score_extraction_set("offline")


def test_the_extraction_set_has_forty_natural_requests_in_five_languages():
    natural = bench.load_extraction_set()["natural"]
    assert len(natural) >= 40 and len(bench.load_extraction_set()["dialogues"]) >= 30
    for word in ("Quiero", "Ich", "Je", "Vorrei", "I'd"):   # one sentence of each language, at least
        assert any(item["message"].startswith(word) for item in natural), word


@pytest.mark.parametrize("mode", bench.MODES)
def test_extraction_set_accepts_only_what_users_said_and_never_reads_less_than_offline(mode, offline_scores,
                                                                                        capsys):
    scores = offline_scores if mode == "offline" else bench.score_extraction_set(mode)
    for name, score in scores.items():
        with capsys.disabled():
            print(f"\n[extraction set, {mode}, {name}] precision {score['precision']:.0%}, recall "
                  f"{score['recall']:.0%} ({score['recalled']}/{score['stated']}); misses: "
                  f"{', '.join(score['misses']) or 'none'}")
        assert score["wrong"] == []
        assert score["recall"] >= offline_scores[name]["recall"]
    assert scores["natural"]["recall"] >= 0.6   # issue 9: offline on natural one-line requests


def read(workflow, text, known=None, **state):
    """What the reader takes from ``text`` offline: ``workflow`` is one, or a shipped one's
    name; the conversation has the values ``known`` so far and ``state`` (the inputs asked)."""
    if isinstance(workflow, str):
        workflow = cozyopenai.load_workflows(WORKFLOWS_PATH)[workflow]
    conversation = new_conversation(workflow.name, **state)
    conversation.values.update(known or {})
    return cozyopenai.extract_offline(workflow, conversation, text).values


@pytest.mark.parametrize("text, expected", [
    ("Rome, 1500 euros, first week of May", {"destination": "Rome", "budget": 1500, "travel_dates": "first week of May"}),
    ("Florence it is.", {"destination": "Florence"}),
    ("Kyoto", {"destination": "Kyoto"}),
    ("Honeymoon!! Santorini, 4.5k total, late June", {"destination": "Santorini", "budget": 4500,
                                                      "travel_dates": "late June"}),
    ("Somewhere in Italy, maybe?", {}),
    ("My friend went to Paris, but I want to go to Athens", {"destination": "Athens"}),
    ("Trip to New York over New Year's Eve", {"destination": "New York", "travel_dates": "New Year's Eve"}),
    ("Trip to Tokyo for the cherry blossom season next spring",
     {"destination": "Tokyo", "travel_dates": "the cherry blossom season next spring"}),
    ("I don't want to go in July, rather August. Trip to Oslo.", {"destination": "Oslo", "travel_dates": "August"}),
    ("We don't have much time to plan a trip to Oslo", {"destination": "Oslo"}),
    ("Trip to Rome. It costs 50 euros a night.", {"destination": "Rome"}),
    ("Trip to Rome. It costs 50 euros a night, 900 euros in total.", {"destination": "Rome", "budget": 900}),
    ("Paris, Texas, not Paris, France", {"destination": "Paris, Texas"}),
    ("A trip to Rio de Janeiro in May", {"destination": "Rio de Janeiro", "travel_dates": "May"}),
    ("Last year in Paris we spent 3000 euros. This time Prague, 1000 euros, 2.–6. May.",
     {"destination": "Prague", "budget": 1000, "travel_dates": "2.–6. May"}),
    ("Trip to Pa\x00ris", {"destination": "Paris"}),
    ("Trip to \u200fParis", {"destination": "Paris"}),
    ("porto, 400 euros, fim de semana que vem", {"destination": "porto", "budget": 400,
                                                 "travel_dates": "fim de semana que vem"}),
    ("oi gente, a gente quer viajar", {}),
    ("Viagem ao Rio, R$3 mil", {"destination": "Rio", "budget": 3000}),
    ("- where: Lisbon\n- budget: €1,800\n- when: 3/5–3/12", {"destination": "Lisbon", "budget": 1800,
                                                            "travel_dates": "3/5–3/12"}),
    ("- Ziel: Kopenhagen\n- Budget: 2.000 EUR", {"destination": "Kopenhagen", "budget": 2000}),
    ("Quero ir a Lisboa em maio com 1500 euros", {"destination": "Lisboa", "travel_dates": "maio", "budget": 1500}),
    ("Não quero ir a Paris, prefiro Roma", {"destination": "Roma"}),
])
def test_the_floor_reads_each_rule_of_the_grammar(trip_planner, text, expected):
    assert read(trip_planner, text) == expected


@pytest.mark.parametrize("text, asked, known, expected", [
    ("42", ["travel_dates"], {"destination": "Paris", "budget": 2000}, {}),
    ("around $3000", ["travel_dates"], {"destination": "Paris", "budget": 2000}, {"budget": 3000}),   # a change
    ("2027", ["travel_dates"], {"destination": "Paris", "budget": 2000}, {}),   # no currency: not surely an amount
    ("next March", ["travel_dates"], {}, {"travel_dates": "next March"}),
    ("2000", ["destination"], {}, {"budget": 2000}),
    ("1 500 €, du 10 au 17 avril", ["budget"], {"destination": "Nice"}, {"budget": 1500,
                                                                      "travel_dates": "du 10 au 17 avril"}),
    ("1800 dollars, September 5 to 12", ["budget"], {}, {"budget": 1800, "travel_dates": "September 5 to 12"}),
    ("Neapel. Entschieden.", ["destination"], {}, {"destination": "Neapel"}),
    ("4 giorni a marzo va bene, ma il budget è 600", ["destination"], {}, {"travel_dates": "4 giorni a marzo",
                                                                           "budget": 600}),
])
def test_a_direct_answer_is_of_the_asked_type_or_goes_to_the_one_input_it_fits(trip_planner, text, asked, known,
                                                                              expected):
    conversation = new_conversation(asked=asked)
    conversation.values.update(known)
    assert cozyopenai.extract_offline(trip_planner, conversation, text).values == expected


def test_a_money_input_is_never_negative_unless_its_file_says_so(trip_planner):
    extraction = cozyopenai.extract_offline(trip_planner, new_conversation(), "Trip to Oslo, with a budget of -5")
    assert "budget" not in extraction.values and extraction.rejected["budget"] == "the budget must be at least 0, not -5"


@pytest.mark.parametrize("text, changed", [("Make it packed.", True), ("packed", True), ("Actually make it busy.", True),
                                           ("I want a packed pace instead", True), ("Show me the full plan", False),
                                           ("Ach nein, da ist es zu voll.", False)])
def test_a_choice_made_before_changes_only_when_the_message_asks_for_it(trip_planner, text, changed):
    conversation = new_conversation()
    conversation.values.update(destination="Lisbon", budget=2000, travel_dates="May", pace="relaxed")
    values = cozyopenai.extract_offline(trip_planner, conversation, text).values
    assert values.get("pace") == ("packed" if changed else None)


def test_pasted_replies_quotes_and_code_blocks_are_context_never_values(trip_planner):
    ours = "Got it: destination Paris. I still need your budget."
    history = [{"role": "user", "content": "Trip to Paris"}, {"role": "assistant", "content": ours}]
    text = f"I would like to go to Rome instead, budget 1500 euros. Here is what you told me before:\n{ours}"
    conversation = new_conversation()
    conversation.values["destination"] = "Paris"
    assert cozyopenai.extract_offline(trip_planner, conversation, text, history).values == {
        "destination": "Rome", "budget": 1500}
    assert read(trip_planner, "> destination: Paris\nTrip to Oslo") == {"destination": "Oslo"}
    assert read(trip_planner, "```\nbudget: 3\n```\nTrip to Rome, a week in mid-October") == {
        "destination": "Rome", "travel_dates": "a week in mid-October"}


@pytest.mark.parametrize("text, expected", [
    ('My husband got this from you: "Plan a trip to Barcelona for two weeks in August, with a total budget of 4000." '
     "I want Edinburgh", {"destination": "Edinburgh"}),
    ("Mon collègue m'a transféré ta réponse : « Voici votre voyage à Berlin, 5 jours en juin, budget 1200 € ». "
     "Moi c'est pour Vienne", {"destination": "Vienne"}),
    ("Mi amiga me pasó esto: 'Plan para Roma, 4 días, 800 euros'. Yo quiero ir a Lisboa", {"destination": "Lisboa"}),
    ("Er schrieb „Plan a trip to Prag for 3 days, budget 500“ und ich will nach Krakau", {"destination": "Krakau"}),
    ('A trip to "Lisbon" in May', {"destination": "Lisbon", "travel_dates": "May"}),
    ("I'm off to 'Rome' in May, it's our anniversary", {"destination": "Rome", "travel_dates": "May"}),
])
def test_a_passage_of_several_words_in_quotation_marks_is_context_and_a_quoted_value_is_read(trip_planner, text,
                                                                                             expected):
    assert read(trip_planner, text) == expected


@pytest.mark.parametrize("text, expected", [
    ("il budget è 600", {"budget": 600}), ("o orçamento é 2000", {"budget": 2000}),
    ("destinazione è Roma", {"destination": "Roma"}), ("Umstieg in Istanbul, Ziel ist Bangkok.", {"destination": "Bangkok"}),
    ("the city was lovely", {}),
    ("Volevo Verona", {"destination": "Verona"}), ("I want Rome in May", {"destination": "Rome", "travel_dates": "May"}),
    ("I would like Italian food", {}),
])
def test_a_label_in_any_language_or_a_wish_leads_to_the_value_after_it(trip_planner, text,
                                                                                            expected):
    assert read(trip_planner, text) == expected


@pytest.mark.parametrize("text, expected", [
    ("salut jveux aller a lyon 4 jours en octobre", {"destination": "lyon", "travel_dates": "4 jours en octobre"}),
    ("hallo, wir wollen nach amsterdam, so 4 tage anfang dezembr", {"destination": "amsterdam",
                                                                    "travel_dates": "4 tage anfang dezembr"}),
    ("we want to go to the beach in july", {"travel_dates": "july"}),
    ("we want to take it slow", {"pace": "relaxed"}),
    ("viaje a bilbao prsupuesto 900e finde largo de mayo", {"travel_dates": "finde largo de mayo"}),
    ("Familienurlaub in Dänemark, 10 Tage in den Herbstferien", {"destination": "Dänemark",
                                                                 "travel_dates": "10 Tage in den Herbstferien"}),
    ("Trip to Rome in Augusta", {"ambiguous": ["Rome", "Augusta"]}),
    ("Gesamtbudget 1500, über Ostern", {"budget": 1500, "travel_dates": "Ostern"}),
    ("Ich will nach Madrid, der Flug kostet etwa 150 Euro pro Person", {"destination": "Madrid"}),
    ("Hai scritto: “destinazione: Venezia”. No, ho detto Verona!", {}),
    ("my friend went to Paris last year and loved it, but I want Athens", {"destination": "Athens"}),
    ("I want Athens, but last year we went to Paris", {"destination": "Athens"}),
    ("Kreta. Budget 2500, Mitte September", {"destination": "Kreta", "budget": 2500, "travel_dates": "Mitte September"}),
    ("yeah Seville it is. 2k", {"destination": "Seville", "budget": 2000}),
    ("Great. In May.", {"travel_dates": "May"}),
    ("we want to do lisbon the first week of may", {"travel_dates": "the first week of may"}),
    ("Faccio scalo a Istanbul, ma la meta è Bangkok.", {"destination": "Bangkok"}),
    ("com as crianças, orçamento 4 mil reais", {"budget": 4000, "children": True}),
    ("I may go", {}),
])
def test_lower_case_places_compound_words_misspelt_months_and_quoted_labels_are_read_by_rule(trip_planner, text,
                                                                                             expected):
    extraction = cozyopenai.extract_offline(trip_planner, new_conversation(), text)
    if "ambiguous" in expected:
        assert extraction.ambiguous["destination"] == expected["ambiguous"]
    else:
        assert extraction.values == expected


def test_an_abbreviation_with_its_dot_is_inside_a_name(start):
    weather = cozyopenai.load_workflows(os.path.join(HERE, "workflows.json"))["weather-now"]
    extraction = cozyopenai.extract_offline(weather, new_conversation(), "Wie warm ist es in St. Gallen? Bitte in Celsius")
    assert extraction.values == {"city": "St. Gallen", "units": "celsius"}


@pytest.mark.parametrize("text, expected", [("de 10/06 a 15/06", {"travel_dates": "10/06 a 15/06"}),
                                            ("Como", {"destination": "Como"})])
def test_a_reply_to_where_that_names_no_place_is_not_a_place(trip_planner, text, expected):
    conversation = new_conversation(asked=["destination"])
    conversation.values["budget"] = 1200
    assert cozyopenai.extract_offline(trip_planner, conversation, text).values == expected


def test_a_labelled_value_in_quotes_or_as_data_keeps_its_quotes():
    assert cozyopenai.user_words('title: "Our great trip to Rome"') == 'title: "Our great trip to Rome"'
    assert cozyopenai.user_words('word: {"items": [7], "name": "Ada"}') == 'word: {"items": [7], "name": "Ada"}'


@pytest.mark.parametrize("text, written", [
    ("deux mille euros", "2000 euros"), ("sagen wir dreitausendfünfhundert Franken", "sagen wir 3500 Franken"),
    ("mil e quinhentos euros", "1500 euros"), ("budget: twelve hundred dollars", "budget: 1200 dollars"),
    ("presupuesto mil doscientos euros", "presupuesto 1200 euros"), ("marzo del duemilaventisette", "marzo del 2027"),
    ("Budget : trois mille cinq cents euros.", "Budget : 3500 euros."), ("mil pavos", "1000 pavos"),
    ("two weeks in May", "two weeks in May"), ("3 mil reais", "3 mil reais"), ("50 cents", "50 cents"),
    ("Mila and I", "Mila and I"), ("a trip to Cinque Terre", "a trip to Cinque Terre"),
])
def test_amounts_and_years_in_words_are_put_in_digits_and_small_counts_stay_words(text, written):
    assert cozyopenai.numbers_as_digits(text) == written


def test_number_words_add_and_multiply_as_they_are_said():
    assert cozyopenai.cardinal_value([3, 1000, 5, 100]) == 3500 and cozyopenai.cardinal_value([12, 100]) == 1200
    assert cozyopenai.cardinal_value([2, 1000, 20, 7]) == 2027 and cozyopenai.cardinal_value([1000, 200]) == 1200


@pytest.mark.parametrize("field, table", [("cardinals", "CARDINALS"), ("ordinals", "ORDINALS")])
def test_no_number_word_has_two_values_in_the_tables(field, table):
    spoken = {}
    for language in cozyopenai.LANGUAGES.values():
        for entry in getattr(language, field).split():
            word, _, value = entry.partition(":")
            assert spoken.setdefault(word.replace("-", ""), int(value)) == int(value), word
    assert spoken == dict(getattr(cozyopenai, table))
    with pytest.raises(ValueError, match=f"{field}: 'uno' has two values"):
        twice = dataclasses.replace(cozyopenai.ENGLISH, code="xx", **{field: "uno:1"}), dataclasses.replace(
            cozyopenai.ENGLISH, code="yy", **{field: "uno:2"})
        cozyopenai.valued_words(field, twice)


@pytest.mark.parametrize("text, expected", [
    ("calendário de março de 2026", {"year": 2026, "month": 3}), ("junho", {"month": 6}),
    ("calendar for december 2025 pls", {"year": 2025, "month": 12}), ("sept 2026", {"year": 2026, "month": 9}),
    ("sept", {}), ("affiche moi le mois 7", {"month": 7}), ("quiero ver el mes 5", {"month": 5}),
    ("mostra o mês 12", {"month": 12}), ("the 11th month", {"month": 11}),
    ("il terzo mese del 2027", {"year": 2027, "month": 3}), ("the first month of 2027", {"year": 2027, "month": 1}),
    ("el mar en mayo 2026", {"year": 2026, "month": 5}), ("can i see it for '27", {"year": 2027}),
])
def test_a_month_input_takes_its_names_its_number_after_a_month_word_and_an_ordinal_before_one(text, expected):
    assert read("month-calendar", text) == expected


@pytest.mark.parametrize("text, expected", [
    ("budget is now three thousand euros", {"budget": 3000}),
    ("le budget est maintenant de trois mille euros", {"budget": 3000}),
    ("3000 euros", {"budget": 3000}), ("anzi, facciamo Napoli", {"destination": "Napoli"}),
    ("finalement Nice", {"destination": "Nice"}), ("I changed my mind: Rome", {"destination": "Rome"}),
    ("make it porto", {"destination": "porto"}), ("3000", {}),
])
def test_a_correction_of_a_known_value_is_read_in_any_of_its_usual_forms(trip_planner, text, expected):
    conversation = new_conversation(asked=["travel_dates"])
    conversation.values.update(destination="Milano", budget=2000)
    assert cozyopenai.extract_offline(trip_planner, conversation, text).values == expected


@pytest.mark.parametrize("model, text, expected", [
    ("trip-planner", "1800€. ah non attends, on sera trois, mets plutôt 2500", {"budget": 2500}),
    ("trip-planner", "900 Euro. ach nee, sagen wir lieber zwölfhundert", {"budget": 1200}),
    ("trip-planner", "orçamento 3000 dólares... hmm, melhor 3500", {"budget": 3500}),
    ("trip-planner", "600 bucks. oh wait, next weekend is my sister's wedding, make it the weekend after next",
     {"budget": 600, "travel_dates": "the weekend after next"}),
    ("trip-planner", "budget: 1500, and we might spend 2000 on flights", {"budget": 1500}),
    ("month-calendar", "calendar for july 2026 please... no sorry, august not july", {"year": 2026, "month": 8}),
    ("month-calendar", "le calendrier de septembre 2026, euh non, 2027 pardon", {"year": 2027, "month": 9}),
    ("month-calendar", "calendario de abril 2030, no espera, mejor junio", {"year": 2030, "month": 6}),
    ("month-calendar", "calendário de outubro 2029, ops, quis dizer 2030", {"year": 2030, "month": 10}),
])
def test_a_value_corrected_in_the_same_message_is_the_later_one_of_any_kind(model, text, expected):
    workflow = cozyopenai.load_workflows(os.path.join(HERE, "workflows.json"))[model]
    extraction = cozyopenai.extract_offline(workflow, new_conversation(model), text)
    assert extraction.values == expected and not extraction.ambiguous


@pytest.mark.parametrize("text, expected", [
    ("orçamento 3000, melhor 3500, por causa dos presentes de natal", {"budget": 3500}),
    ("wir waren letzten Sommer in Kroatien. Jetzt nach Norwegen, zwei Wochen im August",
     {"destination": "Norwegen", "travel_dates": "zwei Wochen im August"}),
    ("the last two weeks of june", {"travel_dates": "the last two weeks of june"}),
])
def test_values_in_a_clause_of_why_or_of_the_past_are_context(trip_planner, text, expected):
    assert read(trip_planner, text) == expected


@pytest.mark.parametrize("model, text, expected", [
    ("weather-now", "weather in san francisco in fahrenheit", {"city": "san francisco", "units": "fahrenheit"}),
    ("weather-now", "il fait combien a new york la maintenant ?", {"city": "new york"}),
    ("weather-now", "wie warm ist es gerade in frankfurt am main? in celsius bitte",
     {"city": "frankfurt am main", "units": "celsius"}),
    ("weather-now", "que temperatura hace ahora en ciudad de mexico?", {"city": "ciudad de mexico"}),
    ("weather-now", "qual a temperatura agora em miami?", {"city": "miami"}),
    ("weather-now", "tiempo en bogotá, colombia en grados celsius", {"city": "bogotá, colombia", "units": "celsius"}),
    ("weather-now", "I'm from Denver but stuck in Toronto, Canada for work. How cold is it in Toronto?",
     {"city": "Toronto, Canada"}),
    ("trip-planner", "will nach rio de janeiro!!! 3 wochen im januar",
     {"destination": "rio de janeiro", "travel_dates": "3 wochen im januar"}),
    ("trip-planner", "Not Paris France lol, Paris, Texas 🤠 road trip over Memorial Day weekend",
     {"destination": "Paris, Texas", "travel_dates": "Memorial Day weekend"}),
    ("trip-planner", "viaje a bilbao prsupuesto 900e finde largo de mayo", {"travel_dates": "finde largo de mayo"}),
    ("trip-planner", "budget 2000 in total", {"budget": 2000}),
])
def test_places_of_several_words_in_lower_case_and_a_place_with_its_region_are_one_name(model, text, expected):
    assert read(model, text) == expected


@pytest.mark.parametrize("text, expected", [
    ("mid-oct, 10 days or so", {"travel_dates": "mid-oct, 10 days or so"}),
    ("zwei Wochen oder so im Juli", {"travel_dates": "zwei Wochen oder so im Juli"}),
    ("need a getaway end of march, 4 nights", {"travel_dates": "end of march, 4 nights"}),
    ("2500 dólares, las dos primeras semanas de diciembre",
     {"budget": 2500, "travel_dates": "las dos primeras semanas de diciembre"}),
    ("gastamos 2000 cada una 🙈 este año queremos ir a Dublín, 5 días en marzo",
     {"destination": "Dublín", "travel_dates": "5 días en marzo"}),
    ("Reiseplanung", {}), ("Williamsburg", {"destination": "Williamsburg"}),
])
def test_a_period_keeps_its_approximation_and_ends_at_an_emoji_and_a_travel_compound_is_no_name(trip_planner, text,
                                                                                               expected):
    assert read(trip_planner, text) == expected


@pytest.mark.parametrize("known, text, expected", [
    ({"destination": "rome"}, "actually make it naples instead, rome is too crowded in summer", {"destination": "naples"}),
    ({"destination": "Rome"}, "Actually make it Florence instead, Rome is way too crowded then.",
     {"destination": "Florence"}),
    ({"travel_dates": "Oktober"}, "ach nee, lieber im März, Oktober geht bei der Arbeit nicht", {"travel_dates": "März"}),
    ({"travel_dates": "novembre"}, "anzi no, a dicembre, per i mercatini di Natale", {"travel_dates": "dicembre"}),
    ({"destination": "Cancún"}, "mejor a Tulum, me dijeron que es más tranquilo", {"destination": "Tulum"}),
])
def test_what_is_said_of_the_value_replaced_or_by_others_gives_no_value(trip_planner, known, text, expected):
    assert read(trip_planner, text, known) == expected


@pytest.mark.parametrize("text, expected", [
    ("Prague, 1200, 12/07-19/07", {"destination": "Prague", "budget": 1200, "travel_dates": "12/07-19/07"}),
    ("Wir fahren mit unseren zwei Kleinen (3 und 6) nach Südtirol, in den Pfingstferien, 3000",
     {"destination": "Südtirol", "budget": 3000, "travel_dates": "den Pfingstferien"}),
    ("Rome, 5, June", {"destination": "Rome", "travel_dates": "June"}),
    ("vom 28.12. bis 2.1., Budget 1000", {"travel_dates": "vom 28.12. bis 2.1.", "budget": 1000}),
    ("2000 €, zweite Juliwoche", {"budget": 2000, "travel_dates": "zweite Juliwoche"}),
    ("1300 €, et on emmène mon fils de 7 ans", {"budget": 1300, "children": True}),
    ("uma semana em outubro, 1000 euros, só adultos",
     {"budget": 1000, "travel_dates": "uma semana em outubro", "children": False}),
])
def test_a_listed_bare_amount_dotted_dates_month_compounds_and_words_for_children_are_read(trip_planner, text,
                                                                                          expected):
    assert read(trip_planner, text) == expected


def test_the_reply_to_the_budget_question_takes_its_bare_number_beside_the_dates(trip_planner):
    assert read(trip_planner, "1500, last two weeks of june", {"destination": "naples"}, asked=["budget"]) == {
        "budget": 1500, "travel_dates": "last two weeks of june"}


@pytest.mark.parametrize("text, expected", [
    ("This time my wife wants somewhere quieter so we're heading to Positano", {"destination": "Positano"}),
    ("mi hermano me dijo así que Berlín", {"destination": "Berlín"}), ("donc voilà, Rome !", {"destination": "Rome"}),
    ("so maybe Rome", {}),
    ("New York!! 5 nights over new year's eve", {"destination": "New York", "travel_dates": "5 nights over new year's eve"}),
    ("need a getaway end of march, 4 nights, 1000 max", {"budget": 1000, "travel_dates": "end of march, 4 nights"}),
    ("budget max. 800", {"budget": 800}),
    ("el año pasado fui a londres 🙈 este año queremos ir a Dublín, 5 días en marzo",
     {"destination": "Dublín", "travel_dates": "5 días en marzo"}),
    ("l'anno scorso siamo stati in Grecia. Quest'anno vorremmo andare in Scozia", {"destination": "Scozia"}),
])
def test_a_conclusion_decides_an_emoji_or_this_year_ends_the_past_and_a_limit_makes_an_amount(trip_planner, text,
                                                                                              expected):
    assert read(trip_planner, text) == expected


@pytest.mark.parametrize("model, asked, text, expected", [
    ("trip-planner", [], "von Ende Juli bis Mitte August", {"travel_dates": "von Ende Juli bis Mitte August"}),
    ("trip-planner", [], "visitar a Madeira entre 4 e 11 de maio", {"destination": "Madeira",
                                                                   "travel_dates": "entre 4 e 11 de maio"}),
    ("trip-planner", [], "last wk of april", {"travel_dates": "last wk of april"}),
    ("trip-planner", [], "in April", {"travel_dates": "April"}),
    ("trip-planner", [], "trip to lisbon, actually make it porto", {"destination": "porto"}),
    ("trip-planner", ["destination"], "plutôt biarritz en fait", {"destination": "biarritz"}),
    ("trip-planner", [], "mejor que sean 7 días", {"travel_dates": "7 días"}),
    ("weather-now", [], "I'm flying from Denver to Salt Lake City tomorrow", {"city": "Salt Lake City"}),
    ("weather-now", ["city"], "celsius", {"units": "celsius"}),
    ("weather-now", ["city"], "weather in lyon", {"city": "lyon"}),
    ("weather-now", ["city"], "boston. no wait i meant providence", {"city": "providence"}),
])
def test_a_range_keeps_its_opener_and_a_reply_gives_what_it_names_not_what_was_asked(model, asked, text, expected):
    assert read(model, text, asked=asked) == expected


@pytest.mark.parametrize("text, expected", [
    ('copying from my notes:\n"Trip: Marrakech\nWhen: 3-9 March"', {"destination": "Marrakech",
                                                                  "travel_dates": "3-9 March"}),
    ("Not Paris — Lyon", {"destination": "Lyon"}),
    # After a comma, a name may be the ruled-out one's region: nothing is taken on a guess.
    ("not Paris, Texas", {}), ("not Paris, Lyon", {}),
    ("I don't want to go to Paris, France is too expensive", {}),
    ("Paris, Texas, not Paris, France", {"destination": "Paris, Texas"}),
    ("Trip to New\nYork in May", {"destination": "New York", "travel_dates": "May"}),
    ("Städtetrip Prag", {"destination": "Prag"}), ("Badeurlaub Mallorca", {"destination": "Mallorca"}),
    ("zweite Oktoberhälfte", {"travel_dates": "zweite Oktoberhälfte"}),
    ("vom 15.-18.10.", {"travel_dates": "15.-18.10."}),
    ("Hamburg, Wochenende 12./13. Juli", {"destination": "Hamburg", "travel_dates": "Wochenende 12./13. Juli"}),
])
def test_a_line_break_before_an_item_ends_a_name_and_german_compounds_and_ranges_read(
        trip_planner, text, expected):
    assert read(trip_planner, text) == expected


@pytest.mark.parametrize("text, expected", [
    ("viaje a Lima en junio con 1500", {"destination": "Lima", "travel_dates": "junio", "budget": 1500}),
    ("mit 2 Kindern nach Rom", {"destination": "Rom", "children": True}),
    ("el año pasado fui a Dublín con 880 €. Este año quiero algo diferente: Marruecos, una semana a finales de "
     "octubre.", {"destination": "Marruecos", "travel_dates": "una semana a finales de octubre"}),
    ("Reise nach Schottland. Zeitraum: Ostern, 10 Tage. Budget 2800 €.",
     {"destination": "Schottland", "travel_dates": "Ostern, 10 Tage", "budget": 2800}),
    ("travel_dates: in May. budget: 300", {"travel_dates": "in May", "budget": 300}),
    ("destination: Washington D.C.", {"destination": "Washington D.C."}),
    ("- Zeitraum: 3.–10. Juni", {"travel_dates": "3.–10. Juni"}),
    ("un truc au bord de la mer, disons Nice", {"destination": "Nice"}),
    ("Não quero Cancún, muito turístico. Que tal Tulum?", {"destination": "Tulum"}),
    ("Italia, tal vez?", {}),
    ("Viajamos a Lima en mayo con 150, somos un colegio", {"destination": "Lima", "travel_dates": "mayo"}),
    ("Vou a Lisboa com 1500? é suficiente?", {"destination": "Lisboa"}),
    ("dates du voyage: 3-9 mars, budget 1200", {"travel_dates": "3-9 mars", "budget": 1200}),
    ("destination: Paris?? not sure", {"destination": "Paris?? not sure"}),
    ("Kinder: zwei, 8 und 10 Jahre", {"children": True, "travel_dates": "8 und 10 Jahre"}),
    ("Enfants: deux, on va à Lyon", {"children": True, "destination": "Lyon"}),
    ("children: 0", {"children": False}), ("niños: sí, uno", {"children": True}),
    ("children: no, wait, yes, one", {}),
    ("Tempo: 2 settimane a maggio", {"travel_dates": "2 settimane a maggio"}),
])
def test_an_amount_a_word_brings_a_labelled_period_whole_and_a_lines_first_sentence_are_read(trip_planner, text,
                                                                                              expected):
    assert read(trip_planner, text) == expected


@pytest.mark.parametrize("text, expected", [
    ("tre giorni 8-10 dicembre, 500 euro", {"travel_dates": "8-10 dicembre", "budget": 500}),
    ("3 nights, 12/07-15/07", {"travel_dates": "12/07-15/07"}),
    ("de 9 a 16 de fevereiro, depois do carnaval", {"travel_dates": "de 9 a 16 de fevereiro"}),
    ("from March 3 to March 14", {"travel_dates": "from March 3 to March 14"}),
    ("Wochenende 12./13. Juli", {"travel_dates": "Wochenende 12./13. Juli"}),
    ("Pfingsten, 5 Tage", {"travel_dates": "Pfingsten, 5 Tage"}),   # no range of days: both parts kept
])
def test_a_range_of_days_is_the_period_without_a_count_or_a_time_that_says_it_again(trip_planner, text, expected):
    assert read(trip_planner, text) == expected


@pytest.mark.parametrize("known, text, expected", [
    ({}, "tutto agosto, veniamo con i bambini", {"travel_dates": "tutto agosto", "children": True}),
    ({}, "Amsterdam 22/04-26/04, 800€ a testa e siamo in due quindi 1600 in totale",
     {"travel_dates": "22/04-26/04", "budget": 1600}),
    ({}, "2000 au total pour Rome", {"destination": "Rome", "budget": 2000}),
    ({"travel_dates": "cet été"}, "deux semaines en juillet", {"travel_dates": "deux semaines en juillet"}),
    ({"travel_dates": "cet été"}, "3000 euros, deux semaines en juillet", {"budget": 3000}),   # not a period alone
])
def test_a_whole_part_a_total_and_a_message_that_is_only_a_period_are_read(trip_planner, known, text, expected):
    assert read(trip_planner, text, known) == expected


def test_a_quoted_block_of_label_lines_gives_only_what_the_users_own_words_leave_open(trip_planner):
    pasted = "Hier die Eckdaten aus unserer Mail:\n> Ziel: Kopenhagen\n> Reisezeit: 22.–26.09.\n> Budget: 1.500 EUR"
    assert read(trip_planner, pasted) == {"destination": "Kopenhagen", "travel_dates": "22.–26.09.", "budget": 1500}
    assert read(trip_planner, "My friend's plan:\n> budget: 5000\nMine is 2000 euros for Rome") == {
        "budget": 2000, "destination": "Rome"}
    assert read(trip_planner, "> destination: ...\n> budget: ...") == {}   # the line form, quoted back
    ours = "Got it: destination Paris.\n\n    destination: Paris"
    history = [{"role": "assistant", "content": ours}]
    extraction, _ = cozyopenai.read_floor(trip_planner, new_conversation("trip-planner"), "> destination: Paris", history)
    assert extraction.values == {}   # a line of our own reply is never the user's


def test_a_value_said_again_after_its_correction_stands_and_one_talked_about_after_it_stays_ruled_out():
    assert read("month-calendar", "quero ver o calendário de maio 2030, não, maio 2032") == {"year": 2032, "month": 5}
    assert read("month-calendar", "March 2026, no, April 2026") == {"year": 2026, "month": 4}
    assert read("trip-planner", "budget 3000, no, 2000, 3000 is too much") == {"budget": 2000}
    assert read("weather-now", "Stadt: Berlin, Einheiten: Fahrenheit") == {"city": "Berlin", "units": "fahrenheit"}
    assert read("month-calendar", "mese: maggio, anno: 2027") == {"month": 5, "year": 2027}


@pytest.mark.parametrize("known, text, expected", [
    ({}, "minha mãe foi para a Itália em maio, eu quero ir para a Grécia", {"destination": "Grécia"}),
    ({}, "my sister went to Rome in May but I'd rather do Florence", {"destination": "Florence"}),
    ({}, "mia figlia è stata in Thailandia l'anno scorso, io e mio marito invece vorremmo andare in Grecia, "
         "solo adulti stavolta", {"destination": "Grecia", "children": False}),
    ({"budget": 2000}, "wait, 2500 not 2000", {"budget": 2500}),
    ({"budget": 6000}, "in realtà 6500, ho ricontrollato", {"budget": 6500}),
    ({"budget": 800}, "ops, quis dizer 1800", {"budget": 1800}),
    ({"budget": 800}, "actually 4", {}),
    ({"budget": 600}, "Korrektur: 800€, hab mich vertippt", {"budget": 800}),
    ({"budget": 2000, "travel_dates": "May 2026"}, "wait, 2027 not 2026", {}),
    ({"budget": 2000}, "in realtà 2027", {}), ({"budget": 2000}, "wait, 300 not 200 people", {}),
    ({}, "I want to go to Rome in May because my sister went there", {"destination": "Rome", "travel_dates": "May"}),
    ({}, "My sister went to Rome and I want to go to Athens in May", {"destination": "Athens", "travel_dates": "May"}),
    ({}, "I visited Lisbon and want to go back in May with 2000 euros", {"travel_dates": "May", "budget": 2000}),
    ({}, "Era il mio sogno andare a Roma in maggio", {"destination": "Roma", "travel_dates": "maggio"}),
    ({}, "Don't forget Paris! That's where I want to go", {}),
    ({}, "how much would a week in Paris cost? actually forget paris, make it Amsterdam", {"destination": "Amsterdam"}),
])
def test_a_trip_made_before_is_context_a_filler_corrects_a_known_amount_and_a_name_forgotten_is_ruled_out(
        trip_planner, known, text, expected):
    assert read(trip_planner, text, known) == expected


@pytest.mark.parametrize("known, text, expected", [
    ({"budget": 1500}, "no wait, 1200. the flights are already paid", {"budget": 1200}),
    ({"budget": 3200}, "non, finalement deux mille sept cents, on a des travaux", {"budget": 2700}),
    ({"budget": 1000}, "anzi no, 1.350 per stare tranquilli", {"budget": 1350}),
    ({"budget": 1500}, "no, 3 kids", {"children": True}),
    ({}, "Mon frère a dépensé 3000 € l'an dernier, moi j'ai 2000 € maximum.", {"budget": 2000}),
    ({}, "j'emmène mon fils de 8 ans", {"children": True}),
    ({}, "Je souhaiterais un rythme équilibré", {"pace": "balanced"}),
    ({"destination": "Lisboa"}, "pensando bem, ritmo equilibrado", {"pace": "balanced"}),
])
def test_a_known_amount_is_corrected_by_a_bare_number_and_an_age_or_a_past_clause_gives_nothing(trip_planner, known,
                                                                                                text, expected):
    assert read(trip_planner, text, known) == expected


@pytest.mark.parametrize("model, asked, known, text, expected", [
    ("month-calendar", [], {}, "what day does feb 1st 2027 fall on?", {"year": 2027, "month": 2}),
    ("trip-planner", ["travel_dates"], {"destination": "Edinburgh"}, "March", {"travel_dates": "March"}),
    ("trip-planner", ["budget"], {"destination": "Prag"}, "nee, Budapest. endgültig.", {"destination": "Budapest"}),
    ("trip-planner", ["budget"], {"destination": "Prag"}, "no Paris", {}),
    ("trip-planner", [], {}, "no carnaval, ritmo intenso", {"travel_dates": "carnaval", "pace": "packed"}),
    ("trip-planner", [], {}, "Lisbon, 1000 euros, no Christmas", {"destination": "Lisbon", "budget": 1000}),
    ("trip-planner", [], {}, "not in July", {}),
])
def test_a_month_before_its_day_a_month_alone_a_name_after_a_lone_no_and_no_as_a_lead(model, asked, known, text,
                                                                                      expected):
    assert read(model, text, known, asked=asked) == expected


@pytest.mark.parametrize("known, text, expected", [
    ({}, "Budget 1500 Euro, aber wir sind 3", {"budget": 1500}),
    ({}, "Rome, 1500 euros, actually we are 2", {"destination": "Rome", "budget": 1500}),
    ({}, "Budget 1500, app version 1.2.3", {"budget": 1500}), ({}, "max 1.2.3", {}),
    ({}, "Rome, 1.2.3.4, June", {"destination": "Rome", "travel_dates": "June"}),
    ({}, "Berlin in July, 2026", {"travel_dates": "July"}), ({}, "Rome in June, kids max 2",
                                                              {"travel_dates": "June", "children": True}),
    ({}, "No, Paris is too expensive", {}), ({}, "Sorry, Rome is fully booked for us", {}),
    ({}, "mon fils de 8 ans et moi, Lisbonne en mai", {"travel_dates": "mai", "children": True}),
    ({}, "Strasbourg pendant les fêtes de Noël", {"travel_dates": "les fêtes de Noël"}),
    ({"destination": "Rome", "budget": 1500}, "2000 euros for Rome please, and make it relaxed",
     {"budget": 2000, "pace": "relaxed"}),
    ({"destination": "Rome", "budget": 1500}, "actually, we are 4.", {}),
    ({"destination": "Rome", "budget": 1500}, "i'd rather relax", {"pace": "relaxed"}),
])
def test_counts_versions_years_and_what_a_sentence_says_of_a_name_are_no_values(trip_planner, known, text, expected):
    assert read(trip_planner, text, known) == expected


def test_a_reply_listing_two_periods_names_no_place(trip_planner):
    assert read(trip_planner, "mi-mai, 5 jours", {"budget": 1500}, asked=["destination"]) == {
        "travel_dates": "mi-mai, 5 jours"}


def test_names_in_a_list_stay_apart_and_a_known_value_named_again_is_no_region(trip_planner):
    assert cozyopenai.extract_offline(trip_planner, new_conversation(), "Rome, Florence, Venice").ambiguous == {
        "destination": ["Rome", "Florence", "Venice"]}
    known = {"destination": "Granada", "travel_dates": "puente de mayo", "budget": 500}
    assert read(trip_planner, "mejor Córdoba, Granada ya la conozco", known) == {"destination": "Córdoba"}
    assert read(trip_planner, "y súbelo a 700", known) == {"budget": 700}


def test_a_message_over_the_reading_limit_is_read_in_its_first_and_last_parts_and_says_so(trip_planner):
    text = "Trip to Rome in May. " + "1 " * 3_000_000 + "budget 2000 euros"
    extraction = cozyopenai.extract_offline(trip_planner, new_conversation(), text)
    assert extraction.values == {"destination": "Rome", "travel_dates": "May", "budget": 2000}
    assert extraction.notes == [cozyopenai.LONG_MESSAGE_NOTE]
    assert len(cozyopenai.within_reading_limit(text)) == cozyopenai.READ_MAX_CHARS


def test_a_chat_turn_on_a_message_over_the_reading_limit_says_so_in_its_thinking(start):
    text = "Trip to Rome in May. " + "1 " * 100_000 + "budget 2000 euros"
    assert cozyopenai.LONG_MESSAGE_NOTE in thinking_of(Chat(start()).say(text))


def test_folded_pattern_matches_a_folded_word_as_written_with_accents():
    pattern = re.compile(r"\b(?:" + cozyopenai.folded_pattern(["e", "sao"]) + r")\b")
    assert pattern.search("il budget è 600") and pattern.search("eles são") and not pattern.search("bien sûr")


def test_a_text_value_is_one_line_with_no_markdown_fence(trip_planner):
    value = cozyopenai.coerce_value(trip_planner.query_inputs["travel_dates"], "3\n```\na week\tin mid-October")
    assert value == "3 a week in mid-October"


def test_a_message_of_only_name_value_lines_reads_the_same_without_the_typed_spans(trip_planner, monkeypatch):
    messages = ["destination: Paris\nbudget: 2000\ntravel dates: May\npace: relaxed\nchildren: yes",
                "destination: not Paris\nbudget: 2000 euros\ntravel dates: a week in June\npace: packed\nchildren: no",
                "destination: Rome or Lyon\nbudget: 1500\ntravel_dates: 2026-05-01 to 2026-05-08\npace: balanced\n"
                "children: no kids",
                "destination: Lisbon\nbudget: 3000\ntravel dates: mayo\npace: too packed\nchildren: with the kids",
                "destination: Lisbon\nbudget: 3000 euros\ntravel dates: mayo\npace: packed\nchildren: with the kids"]
    skipped = 0
    for text in messages:
        fast, fast_reading = cozyopenai.read_floor(trip_planner, new_conversation(), text)
        skipped += cozyopenai._spans_change_nothing(trip_planner, text, fast_reading)
        with monkeypatch.context() as patched:
            patched.setattr(cozyopenai, "_spans_change_nothing", lambda *arguments: False)
            full, full_reading = cozyopenai.read_floor(trip_planner, new_conversation(), text)
        assert (fast.values, fast.rejected, fast.ambiguous, fast_reading.polarity) == (
            full.values, full.rejected, full.ambiguous, full_reading.polarity), text
        assert {k: v for k, v in fast_reading.ruled_out.items() if v} == {
            k: v for k, v in full_reading.ruled_out.items() if v}, text
    assert skipped == 2   # those with "not", "no" and "too" read their spans


def test_an_ascii_text_may_spell_a_number_exactly_where_its_words_start_with_a_number_word():
    def word_by_word(text):
        spelled = cozyopenai._fold(" ".join(cozyopenai.NUMBER_WORD_PATTERN.findall(text))).replace("-", "")
        return any(word.startswith(cozyopenai.CARDINALS_BY_INITIAL.get(word[:1], ())) for word in spelled.split(" "))
    for text in ["word: hello\ncount: 3", "deux mille euros", "Dr-ei Tage", "x-zwei", "3-zwei", "a--zwei", "_uno",
                 "zweitausend", "Berlin", "centre", "quatre-vingt-dix", "", "budget 2000"]:
        assert cozyopenai._may_spell_a_number(text) == word_by_word(text), text


def test_the_ruling_out_words_are_found_without_tokens_wherever_the_tokens_hold_one():
    texts = ["budget: 2000", "word: hello\ncount: 3", "pace: don't care", "Il n'est pas loin", "non-stop: yes",
             "dates: 2027-05-010", "on 1/2/20240", "kids: 0", "kids: 0.5", "x.0", "3no", "1st not", "ZU VOLL",
             "NO", "it's fine", "prefer-ably", "notably", "menos", "a_no", "10-200"]
    for text in texts:
        in_tokens = not cozyopenai.RULING_OUT_WORDS.isdisjoint(token.folded for token in cozyopenai.tokenize(text))
        found = any(pattern.search(" " + text.lower()) for pattern in cozyopenai.RULING_OUT_PATTERNS)
        assert found or not in_tokens, text
    assert not any(pattern.search(" budget: 2000\ncount: 3\nword: hello") for pattern in cozyopenai.RULING_OUT_PATTERNS)
    assert not cozyopenai.RULING_OUT_WORDS & cozyopenai.LONG_MONTHS   # no typo's month becomes one unseen


def test_one_search_finds_the_number_words_and_the_ruling_out_words_as_their_own_searches_do():
    texts = ["word: hello\ncount: 3", "pace: don't care", "not two", "two, not", "deux mille euros", "Dr-ei Tage",
             "x-zwei", "kids: 0", "zero", "NO", "notably", "prefer-ably", "budget 2000", "", "zweitausend nicht"]
    for text in texts:
        lowered = " " + text.lower()
        cue = cozyopenai.ASCII_CUE_PATTERN.search(lowered)
        number = cozyopenai.ASCII_NUMBER_WORD_START.search(lowered)
        word = cozyopenai.RULING_OUT_PATTERNS[0].search(lowered)
        assert bool(cue) == bool(number or word), text
        assert cozyopenai.user_words(text) == cozyopenai.numbers_as_digits(text.strip()), text
        words, rules_out = cozyopenai._user_words(text, ())
        assert rules_out is None or rules_out == bool(cozyopenai.RULING_OUT_PATTERNS[0].search(" " + words.lower())), text
    assert cozyopenai._user_words("word: hello\ncount: 3", ()) == ("word: hello\ncount: 3", False)


####################################################################################
# Questions: asking for what is missing
####################################################################################

def test_the_templated_question_acknowledges_what_was_understood_and_asks_for_the_first_missing_input(trip_planner):
    inputs = trip_planner.query_inputs
    missing = [inputs["budget"], inputs["travel_dates"]]
    assert cozyopenai.question_offline(trip_planner, missing, {"destination": "Paris"}, {}, {}) == (
        "Got it: destination Paris. I still need the budget and travel dates. What is your total budget for the "
        'trip? You can also give several at once, one per line, like "travel dates: ...".')
    assert cozyopenai.question_offline(trip_planner, missing, {}, {}, {}, line_hint=False) == (
        "I still need the budget and travel dates. What is your total budget for the trip?")
    echo = cozyopenai.load_workflows({"workflows": [workflow()]})["echo"]   # an input without its own question
    assert cozyopenai.question_offline(echo, list(echo.query_inputs.values()), {}, {}, {}) == (
        "Could you tell me the word (A word to echo back)?")


def test_the_templated_question_asks_which_one_when_the_message_named_several(trip_planner):
    question = cozyopenai.question_offline(trip_planner, [trip_planner.query_inputs["destination"]], {}, {}, {},
                                           ambiguous={"destination": ["Lima", "Cusco"]})
    assert question == "Which destination do you mean: Lima or Cusco?"


def test_the_templated_question_says_what_changed_and_why_a_value_was_refused(trip_planner):
    question = cozyopenai.question_offline(trip_planner, [trip_planner.query_inputs["travel_dates"]], {},
                                           {"destination": ("Paris", "Rome")},
                                           {"budget": "I need a single number for the budget, not 'lots'"})
    assert question == ("Changed the destination from Paris to Rome. I need a single number for the budget, not "
                        "'lots'. When would you like to travel, and for how long?")


def test_followup_question_lists_only_missing_inputs(start):
    reply = Chat(start()).say("destination: Paris")
    question = answer_of(reply)
    assert question.startswith("Got it: destination Paris. I still need the budget and travel dates.")
    assert "What is your total budget for the trip?" in question
    assert "destination" not in question.split("I still need")[1]


def test_a_rejected_value_stays_missing_and_the_next_question_says_why(start):
    reply = Chat(start()).say("destination: Vienna\nbudget: lots")
    assert "I need a single number for the budget, not 'lots'." in answer_of(reply)
    assert "What is your total budget for the trip?" in answer_of(reply)


def test_competing_values_are_asked_about_by_name(start, fake_llm):
    reply = Chat(start()).say("Quiero ir a Lima o a Cusco en mayo.")
    assert "Understood travel dates: mayo." in reply
    assert "Para «destino», ¿se refiere a Lima o Cusco?" in answer_of(reply)
    reply = Chat(start()).say("I want to go to Lima or Cusco in May.")
    assert "Which destination do you mean: Lima or Cusco?" in answer_of(reply)
    message = "Sydney or Melbourne, 2000 dollars"
    fake_llm.extractions = {message: {"destination": "Sydney"}}
    Chat(start(llm=fake_llm.settings(single_call=False))).say(message)
    question_prompt = fake_llm.calls_of("question")[0]["messages"][0]["content"]
    assert "The user named several values for the destination (Sydney or Melbourne): ask which one" in question_prompt


@pytest.mark.parametrize("first, reply, opening, lines, answer, understood", [
    ("I want to plan a trip.", "hmm, let me think about that for a while",
     'I could not read the destination from "hmm, let me think about that for a while". ',
     "    destination: ...\n    budget: ...\n    travel dates: ...", "destination: Lisbon",
     "Understood destination: Lisbon."),
    # In the user's language, with the labels the line form shows read back as labels.
    ("Je voudrais partir à Lisbonne.", "euh, je ne sais pas encore",
     "Je n'ai rien pu lire pour budget dans « euh, je ne sais pas encore ». ",
     "Vous pouvez aussi l'écrire ainsi, une valeur par ligne :\n\n    budget: ...\n    dates du voyage: ...",
     "budget: 1800\ndates du voyage: du 3 au 10 mai", "Understood travel dates: du 3 au 10 mai."),
])
def test_a_reply_that_answers_nothing_quotes_it_and_shows_the_line_form_it_reads(start, first, reply, opening, lines,
                                                                                  answer, understood):
    chat = Chat(start())
    chat.say(first)
    shown = answer_of(chat.say(reply))
    assert shown.startswith(opening) and lines in shown
    assert understood in chat.say(answer)


def test_with_a_question_call_the_question_is_phrased_by_it_from_what_is_missing(start, fake_llm):
    fake_llm.extractions = {"Paris!": {"destination": "Paris"}}
    reply = Chat(start(llm=fake_llm.settings(single_call=False))).say("Paris!")
    assert answer_of(reply) == fake_llm.question
    call = fake_llm.calls_of("question")[0]
    system = call["messages"][0]["content"]
    assert "- destination: Paris" in system
    assert "- budget: Total budget" in system and "- travel dates: When the user" in system
    assert call["messages"][-1] == {"role": "user", "content": "Paris!"}
    assert call["max_tokens"] == cozyopenai.QUESTION_MAX_TOKENS


GEMMA_DEBRIS = ("<</SYS>>\n> I am not sure if you have a question about the language of your user. "
                "[INST] What is the budget? [/INST]")


@pytest.mark.parametrize("message, question, why", [
    ("Trip to Paris.", GEMMA_DEBRIS, "it holds chat-template debris (<</SYS>>)"),
    ("Trip to Paris.", "<start_of_turn>model\nWhat is your budget?<end_of_turn>", "chat-template debris"),
    ("Trip to Paris.", "Write one short, natural question that asks the user for what is still needed. Budget?",
     "it repeats the server's own instructions"),
    ("Je veux partir à Paris avec un petit budget.", "What is your budget, and when would you like to go?",
     "it is in English, your message in French"),
    ("Trip to Paris.", "Paris! Is a budget of 100,000 yen (about $950) fine for you?",
     "it names '100,000', which you did not say and the workflow does not offer"),
    ("Trip to Paris.", "Paris is lovely. Should we add a day in Versailles, and what is your budget?",
     "it names 'Versailles'"),
    ("Trip to Paris.", "Paris is lovely. Tell me your budget.", "it asks nothing: no question mark"),
    ("Trip to Paris.", "What is your budget? " + "Tell me more about what you like. " * 20, "characters long, over 400"),
])
def test_an_llm_question_that_fails_a_check_is_replaced_by_the_templated_one(start, fake_llm, message, question, why):
    fake_llm.extractions = {message: {"destination": "Paris"}}
    fake_llm.question = question
    reply = Chat(start(llm=fake_llm.settings())).say(message)
    assert answer_of(reply).startswith(   # the templated question is in the user's language
        "Got it: destination Paris. I still need the budget and travel dates." if message.startswith("Trip")
        else "C'est noté : destination Paris. Il me manque encore : budget et dates du voyage.")
    line = next(line for line in thinking_of(reply).splitlines() if "question was not used" in line)
    assert why in line and line.endswith("Asked the templated question instead.")


def test_an_llm_question_in_the_users_language_naming_what_they_said_is_shown(start, fake_llm):
    fake_llm.extractions = {"Je veux partir à Paris.": {"destination": "Paris"}}
    fake_llm.question = "Paris, très bien ! Quel est votre budget, et quand voulez-vous partir ?"
    reply = Chat(start(llm=fake_llm.settings())).say("Je veux partir à Paris.")
    assert answer_of(reply) == fake_llm.question and "not used" not in thinking_of(reply)


def test_single_call_questions_are_checked_too(start, fake_llm):
    fake_llm.extractions = {"Paris!": {"destination": "Paris"}}
    fake_llm.question = "<|im_start|>assistant What is your budget?"
    reply = Chat(start(llm=fake_llm.settings(single_call=True))).say("Paris!")
    assert "chat-template debris (<|im_start|>)" in thinking_of(reply)
    assert "What is your total budget for the trip?" in answer_of(reply)


def test_the_question_prompt_asks_for_the_users_language_and_one_question(start, fake_llm):
    Chat(start(llm=fake_llm.settings(single_call=False))).say("Je voudrais voyager.")
    call = fake_llm.calls_of("question")[0]
    assert "Reply in the language of the user's last message" in call["messages"][0]["content"]
    assert "one short, natural question" in call["messages"][0]["content"]
    assert call["messages"][-1]["content"] == "Je voudrais voyager."


def test_single_call_mode_asks_the_question_within_the_extraction_call(start, fake_llm):
    fake_llm.extractions = {"Paris!": {"destination": "Paris"}}
    chat = Chat(start(llm=fake_llm.settings(single_call=True)))
    assert answer_of(chat.say("Paris!")) == fake_llm.question
    (call,) = fake_llm.calls
    assert call_kind(call) == "extraction" and '"question"' in call["messages"][0]["content"]
    assert "question" in call["response_format"]["json_schema"]["schema"]["required"]


def test_single_call_mode_does_not_use_a_question_written_around_an_ignored_value(start, fake_llm):
    fake_llm.extractions = {"Paris!": {"destination": "Paris", "budget": 9999}}   # 9999: never said
    reply = Chat(start(llm=fake_llm.settings(single_call=True))).say("Paris!")
    assert "Ignored budget" in thinking_of(reply)
    assert answer_of(reply).startswith("Got it: destination Paris. I still need the budget and travel dates.")
    assert len(fake_llm.calls) == 1


def test_a_failed_question_call_falls_back_to_the_templated_question(start, fake_llm):
    fake_llm.extractions = {"Paris!": {"destination": "Paris"}}
    chat = Chat(start(llm=fake_llm.settings()))
    fake_llm.question = ""
    reply = chat.say("Paris!")
    assert "What is your total budget for the trip?" in answer_of(reply)


def test_where_the_upstream_takes_structured_output_a_gathering_turn_is_one_llm_call(start, fake_llm):
    fake_llm.extractions = {"Paris!": {"destination": "Paris"}}
    chat = Chat(start(llm=fake_llm.settings()))
    assert answer_of(chat.say("Paris!")) == fake_llm.question
    assert [call_kind(call) for call in fake_llm.calls] == ["extraction"]
    assert fake_llm.calls[0]["response_format"]["type"] == "json_schema"


def test_the_extraction_calls_question_is_checked_and_templated_when_it_fails(start, fake_llm):
    fake_llm.extractions = {"Paris!": {"destination": "Paris"}}
    fake_llm.question = "Paris! What is your budget? <start_of_turn>user"
    reply = Chat(start(llm=fake_llm.settings())).say("Paris!")
    assert "not used: it holds chat-template debris (<start_of_turn>)" in thinking_of(reply)
    assert "What is your total budget for the trip?" in answer_of(reply) and len(fake_llm.calls) == 1


def test_a_question_written_before_the_simple_reader_found_more_is_templated_with_no_second_call(start, fake_llm):
    text = "Paris!\nbudget: 2000"   # the LLM gives the destination only; the budget line is read anyway
    fake_llm.extractions = {text: {"destination": "Paris"}}
    fake_llm.question = "Paris! What is your budget, and when would you like to go?"   # asks the budget again
    reply = Chat(start(llm=fake_llm.settings())).say(text)
    assert "not used: it was written before the simple reader found more" in thinking_of(reply)
    assert answer_of(reply) == "Got it: budget 2000 and destination Paris. When would you like to travel, and for how long?"
    assert len(fake_llm.calls) == 1


def test_a_question_call_is_streamed_as_written_each_part_shown_once_checked(start, fake_llm):
    fake_llm.extractions = {"Paris!": {"destination": "Paris"}}
    fake_llm.question = ["Paris, lovely! What is your ", "budget? ", "And when would you like to go?"]
    fake_llm.stream_gate, fake_llm.stream_gate_at = threading.Event(), 2   # the last piece waits for the test
    server = start(llm=fake_llm.settings(single_call=False))
    try:
        chunks = server.client.chat.completions.create(model="trip-planner", stream=True,
                                                       messages=[{"role": "user", "content": "Paris!"}])
        shown = ""
        for chunk in chunks:
            shown += (chunk.choices[0].delta.content or "") if chunk.choices else ""
            if "?" in shown:
                break
        assert fake_llm.pieces_sent == 2 and shown.endswith("</thinking>\n\nParis, lovely! What is your budget?")
        fake_llm.stream_gate.set()
        shown += "".join((chunk.choices[0].delta.content or "") for chunk in chunks if chunk.choices)
    finally:
        fake_llm.stream_gate.set()
    assert answer_of(shown) == "Paris, lovely! What is your budget? And when would you like to go?"
    assert "not used" not in thinking_of(shown)


def test_a_streamed_question_stops_at_debris_and_keeps_only_what_was_checked(start, fake_llm):
    fake_llm.extractions = {"Paris!": {"destination": "Paris"}}
    fake_llm.question = ["What is your budget? ", "<start_of_turn>user I am not sure "] + ["and so on "] * 40
    fake_llm.piece_seconds = 0.02
    reply = Chat(start(llm=fake_llm.settings(single_call=False)), stream=True).say("Paris!")
    assert answer_of(reply) == "What is your budget?"
    assert ("The rest of the language model's question was not used: it holds chat-template debris "
            "(<start_of_turn>)") in reply
    assert fake_llm.stream_cut.wait(5), "the question call was read to its end"


def test_a_streamed_question_with_debris_before_any_question_is_templated(start, fake_llm):
    fake_llm.extractions = {"Paris!": {"destination": "Paris"}}
    fake_llm.question = ["<|im_start|>assistant ", "What is your budget?"]
    reply = Chat(start(llm=fake_llm.settings(single_call=False)), stream=True).say("Paris!")
    assert "not used: it holds chat-template debris (<|im_start|>). Asked the templated question" in reply
    assert "What is your total budget for the trip?" in answer_of(reply)


def test_with_a_question_call_asked_for_a_gathering_turn_makes_two_calls(start, fake_llm):
    fake_llm.extractions = {"Paris!": {"destination": "Paris"}}
    answer_of(Chat(start(llm=fake_llm.settings(single_call=False))).say("Paris!"))
    assert [call_kind(call) for call in fake_llm.calls] == ["extraction", "question"]
    assert "question" not in fake_llm.calls[0]["response_format"]["json_schema"]["schema"]["required"]


####################################################################################
# The turn: one user message in, thinking and answer out
####################################################################################

def test_thinking_comes_first_then_the_answer_then_the_identifier_block(start):
    for stream in (False, True):
        reply = Chat(start(), stream=stream).say("destination: Paris\nbudget: 2000\ntravel_dates: May")
        assert reply.startswith("<thinking>\n")
        thinking_end, answer_start = reply.index("</thinking>"), reply.index("## Your trip to Paris")
        id_start = reply.index("```cozyui-conversation-identifier")
        assert thinking_end < answer_start < id_start
        assert "→ plan started" in thinking_of(reply) and "✓ plan finished in" in thinking_of(reply)
        assert reply.count("<thinking>") == 1 and reply.count("</thinking>") == 1


def test_cancel_clears_the_gathered_values_and_runs_nothing(start):
    chat = Chat(start())
    chat.say("destination: Paris\nbudget: 2000")
    reply = chat.say("cancel")
    assert "I've cleared everything" in answer_of(reply)
    assert "Where would you like to go?" in chat.say("hello again")


def test_the_llms_cancel_intent_clears_the_values(start, fake_llm):
    fake_llm.extractions = {"Trip to Madrid with 900 euros.": {"destination": "Madrid", "budget": "900 euros"}}
    fake_llm.intents = {"forget it, I changed my mind": "cancel"}
    chat = Chat(start(llm=fake_llm.settings()))
    chat.say("Trip to Madrid with 900 euros.")
    assert answer_of(chat.say("forget it, I changed my mind")).startswith("Okay, I've cleared everything")


def test_optional_inputs_are_not_asked_for_and_their_default_is_shown(start):
    reply = Chat(start()).say("destination: Paris\nbudget: 2000\ntravel_dates: May")
    assert "Using the default pace: balanced." in thinking_of(reply)
    assert "**Pace:** balanced" in answer_of(reply)


def test_a_correction_while_gathering_is_said_in_the_reply(start):
    chat = Chat(start())
    chat.say("destination: Paris")
    reply = chat.say("destination: Rome")
    assert answer_of(reply).startswith("Changed the destination from Paris to Rome.")


def test_a_required_input_asked_three_times_ends_with_an_offer_to_start_over(start):
    chat = Chat(start(), "month-calendar")
    replies = [answer_of(chat.say(text)) for text in ("calendar please", "hmm?", "what?", "no idea?")]
    assert all("Which year?" in reply for reply in replies[:3])
    assert replies[3] == ("I asked for the year 3 times without an answer I could use. You can give it as "
                          '"year: ...", or say "start over" to begin again.')
    assert "Which month" in chat.say("year: 2026")


@pytest.mark.parametrize("language, message, expected", [
    ("French", "Je voudrais partir à Lisbonne avec 1500 euros",
     "C'est noté : destination Lisbonne et budget 1500. Quand aimeriez-vous partir, et pour combien de temps ?"),
    ("German", "Ich möchte nach Wien reisen",
     "Verstanden: Reiseziel Wien. Mir fehlt noch: Budget und Reisedaten. Wie hoch ist Ihr Gesamtbudget für die "
     "Reise? Sie können auch mehrere auf einmal angeben, eine pro Zeile, etwa „Reisedaten: ...“."),
    ("Spanish", "Quiero ir a Lima o a Cusco en mayo",
     "Entendido: fechas del viaje mayo. Todavía necesito: destino y presupuesto. Para «destino», ¿se refiere a "
     "Lima o Cusco? También puede dar varios a la vez, uno por línea, como «presupuesto: ...»."),
    ("Italian", "vorrei andare a Napoli con 900 euro",
     "Ricevuto: destinazione Napoli e budget 900. Quando vorrebbe partire, e per quanto tempo?"),
    ("Portuguese", "Quero ir a Lisboa em maio com os filhos",
     "Entendido: destino Lisboa, datas da viagem maio e crianças sim. Qual é o seu orçamento total para a viagem?"),
    ("English", "I want to go to Rome with the kids",
     "Got it: destination Rome and children yes. I still need the budget and travel dates. What is your total "
     "budget for the trip? You can also give several at once, one per line, like \"travel dates: ...\"."),
])
def test_the_templated_question_is_in_the_users_language_when_the_workflow_gives_its_questions_in_it(
        start, language, message, expected):
    answer = answer_of(Chat(start()).say(message))
    assert answer == expected
    assert cozyopenai.language_of(answer) in (language, None)


@pytest.mark.parametrize("message, expected", [
    ("Quiero ir a Lima, ritmo intenso, sin niños",
     "Entendido: destino Lima, ritmo intenso y niños no. Todavía necesito: presupuesto y fechas del viaje."),
    # Too short to tell by its common words: told by the words only its language's table holds.
    ("Vorrei andare a Roma. Due settimane a maggio",
     "Ricevuto: destinazione Roma e date del viaggio Due settimane a maggio. Qual è il suo budget totale"),
    ("Lisboa em maio", "Entendido: datas da viagem maio. Ainda preciso de: destino e orçamento. Para onde"),
    ("Rome in May", "Got it: travel dates May."),
    ("que tempo faz? vamos a Lisboa", "Entendido: destino Lisboa."),   # a common word and a word of its own
])
def test_a_templated_reply_names_choices_in_the_users_language_and_tells_a_short_message_by_its_own_words(
        start, message, expected):
    assert answer_of(Chat(start()).say(message)).startswith(expected)


def test_a_choice_as_a_translation_names_it_is_read_as_that_choice(trip_planner):
    assert read(trip_planner, "rythme chargé") == {"pace": "packed"}
    assert dict(trip_planner.query_inputs["pace"].synonyms)["chargé"] == "packed"


def test_a_language_the_workflow_does_not_give_and_a_refused_value_are_answered_in_english(start, tmp_path):
    path = tmp_path / "workflows.json"   # the shipped workflows, less their Italian questions
    data = json.loads(open(WORKFLOWS_PATH, encoding="utf-8").read())
    for query in data["workflows"][0]["query_inputs"].values():
        query.get("translations", {}).pop("it", None)
    path.write_text(json.dumps(data), encoding="utf-8")
    assert answer_of(Chat(start(workflows=str(path))).say("vorrei andare a Napoli con 900 euro")) == (
        "Got it: destination Napoli and budget 900. When would you like to travel, and for how long?")
    # The reasons a value is refused are written in English: the whole reply is, so it reads as one.
    answer = answer_of(Chat(start()).say("Je voudrais partir à Lisbonne avec un budget de -5 euros"))
    assert answer.startswith("Got it: destination Lisbonne. The budget must be at least 0, not -5.")


def test_the_offer_to_start_over_is_in_the_users_language_and_names_the_line_it_reads(start):
    chat = Chat(start(), "month-calendar")
    replies = [answer_of(chat.say(text)) for text in ("le calendrier s'il vous plaît", "hein ?", "quoi ?", "aucune idée ?")]
    assert all("Quelle année ?" in reply for reply in replies[:3])
    assert replies[3] == ("J'ai demandé « année » 3 fois sans réponse que je puisse utiliser. Vous pouvez l'écrire "
                          "« année : ... », ou dire « recommencer » pour reprendre depuis le début.")
    assert "Quel mois" in answer_of(chat.say("année : 2026"))


def test_replies_that_change_other_values_are_no_unanswered_asks(start):
    chat = Chat(start())
    chat.say("Trip to Kyoto, 2000 euros")
    for text in ("3000 euros", "actually make it Osaka", "budget is now 3500 euros", "anzi, facciamo Nara"):
        reply = answer_of(chat.say(text))
        assert "When would you like to travel" in reply and "without an answer I could use" not in reply, reply
    assert "## Your trip to Nara" in answer_of(chat.say("a week in May"))


def test_after_a_run_the_next_message_reruns_with_only_the_changed_value(start):
    chat = Chat(start())
    chat.say("destination: Paris\nbudget: 2000\ntravel_dates: May")
    reply = chat.say("destination: Rome")
    assert "Changed destination: Paris → Rome." in thinking_of(reply)
    assert "## Your trip to Rome" in answer_of(reply) and "2000" in answer_of(reply)


def test_offline_after_a_run_now_do_it_for_rome_reruns_with_only_that_change(start):
    chat = Chat(start())
    chat.say("I want to plan a trip to Paris.")
    chat.say("around $2000")
    chat.say("a week in mid-October")
    reply = chat.say("now do it for Rome")
    assert answer_of(reply).startswith("Changed the destination from Paris to Rome.")
    assert "## Your trip to Rome" in answer_of(reply) and "2000" in answer_of(reply)
    both = answer_of(chat.say("budget 3000, and pace relaxed"))
    assert both.startswith("Changed the budget from 2000 to 3000 and the pace to relaxed.")


def test_after_a_run_a_message_that_changes_nothing_gives_the_last_result_again_without_running(start):
    chat = Chat(start(), "month-calendar")
    first = chat.say("year: 2026\nmonth: 1")
    reply = chat.say("thanks!")
    assert answer_of(reply) == answer_of(first) and "January 2026" in answer_of(reply)
    assert "Your message changes no value, so this is the last result again." in thinking_of(reply)
    assert "Running" not in thinking_of(reply)
    assert "Running month-calendar" in thinking_of(chat.say("again please"))


def test_unicode_emoji_right_to_left_and_very_long_messages_are_read_and_answered(start):
    chat = Chat(start(), stream=True)
    assert "Understood destination: Zürich 🏔." in thinking_of(chat.say("destination: Zürich 🏔"))
    assert "Changed destination: Zürich 🏔 → القاهرة." in thinking_of(chat.say("destination: القاهرة"))
    long_reply = chat.say("budget: 1200\n" + "word " * 200_000)
    assert "Got it: budget 1200." in answer_of(long_reply)


def test_the_identifier_is_sent_once_and_restores_the_conversation(start):
    chat = Chat(start(), stream=True)
    first = chat.say("destination: Paris")
    conversation_id = ID_BLOCK.search(first).group(1)
    assert len(conversation_id) == 32
    second = chat.say("budget: 2000")
    assert not ID_BLOCK.search(second)
    assert "What is your total budget" not in second and "When would you like to travel" in second
    other = Chat(chat.server).say("destination: Paris")
    assert ID_BLOCK.search(other).group(1) != conversation_id


def test_an_unknown_identifier_recovers_by_reading_the_whole_history(start):
    lost_id = "Z" * 32
    history = [
        {"role": "user", "content": "destination: Paris"},
        {"role": "assistant", "content": f"What budget?\n\n```cozyui-conversation-identifier\n{lost_id}\n```"},
        {"role": "user", "content": "budget: 2000"},
        {"role": "assistant", "content": "When?"},
        {"role": "user", "content": "travel_dates: May"},
    ]
    reply = ask(start(), "trip-planner", history)
    assert "## Your trip to Paris" in answer_of(reply) and "2000" in answer_of(reply)


def test_values_recovered_with_the_llm_are_kept_on_the_next_turn(start, fake_llm):
    fake_llm.extractions = {"destination: Paris\nbudget: 2000": {"destination": "Paris", "budget": "2000"},
                            "travel dates: May": {"travel_dates": "May"}}
    server = start(llm=fake_llm.settings())
    history = [{"role": "user", "content": "destination: Paris"},
               {"role": "assistant", "content": "What budget?\n\n```cozyui-conversation-identifier\n" + "R" * 32
                                                + "\n```"},
               {"role": "user", "content": "budget: 2000"}]
    history.append({"role": "assistant", "content": ask(server, "trip-planner", history)})
    history.append({"role": "user", "content": "travel dates: May"})
    reply = ask(server, "trip-planner", history)
    assert "Running trip-planner with destination = Paris, budget = 2000, travel dates = May" in reply
    assert "went back" not in reply


def test_offline_recovery_reads_bare_answers_to_the_questions_before_them(start):
    history = [
        {"role": "user", "content": "I want to plan a trip"},
        {"role": "assistant", "content": "Where would you like to go?\n\n```cozyui-conversation-identifier\n"
                                         + "Q" * 32 + "\n```"},
        {"role": "user", "content": "Paris"},
        {"role": "assistant", "content": "What is your budget?"},
        {"role": "user", "content": "2000"},
        {"role": "assistant", "content": "When?"},
        {"role": "user", "content": "3 to 7 June"},
    ]
    reply = ask(start(), "trip-planner", history)
    assert "## Your trip to Paris" in answer_of(reply) and "2000" in answer_of(reply) and "June" in answer_of(reply)


def test_conversations_can_be_keyed_by_a_header_instead_of_the_identifier_block(start):
    server = start(conversation_header="X-OpenWebUI-Chat-Id")

    def say(history, chat_id):
        response = server.post({"model": "trip-planner", "messages": history},
                               headers={"X-OpenWebUI-Chat-Id": chat_id})
        return response.json()["choices"][0]["message"]["content"]
    history = [{"role": "user", "content": "destination: Paris"}]
    first = say(history, "chat-1")
    assert ID_BLOCK.search(first) is None
    history += [{"role": "assistant", "content": "What budget?"}, {"role": "user", "content": "budget: 2000"}]
    assert "Got it: budget 2000." in say(history, "chat-1")
    assert "Read the earlier messages again: destination = Paris." in thinking_of(say(history, "chat-2"))


def test_a_new_chat_under_a_reused_header_key_starts_from_nothing(start):
    server = start(conversation_header="X-OpenWebUI-Chat-Id")
    headers = {"X-OpenWebUI-Chat-Id": "temporary:socket-1"}   # Open WebUI's temporary chats share this key

    def say(messages):
        response = server.post({"model": "trip-planner", "messages": messages}, headers=headers)
        return response.json()["choices"][0]["message"]["content"]
    history = [{"role": "user", "content": "destination: Paris\nbudget: 2000"}]
    history.append({"role": "assistant", "content": say(history)})
    reply = say([{"role": "user", "content": "destination: Rome"}])   # a new chat: no assistant message yet
    assert "I still need the budget and travel dates" in answer_of(reply)
    assert "A new chat: starting from nothing." in thinking_of(reply)


def test_switching_model_in_the_same_chat_starts_a_new_conversation(start):
    chat = Chat(start())
    first_id = ID_BLOCK.search(chat.say("destination: Paris")).group(1)
    chat.model = "month-calendar"
    reply = chat.say("year: 2026")
    second_id = ID_BLOCK.search(reply).group(1)
    assert second_id != first_id
    assert "Paris" not in answer_of(reply) and "Which month" in answer_of(reply)


def test_messages_to_another_model_in_between_are_neither_read_nor_taken_for_edits(start):
    chat = Chat(start())
    chat.say("destination: Paris")
    chat.model = "month-calendar"
    chat.say("2026")
    assert "edited" not in chat.say("5")
    chat.model = "trip-planner"
    chat.say("budget 2000")
    reply = chat.say("a week in mid-October")
    assert "travel dates = a week in mid-October" in reply and "edited" not in reply


def test_switching_back_to_the_first_model_resumes_its_conversation(start):
    chat = Chat(start())
    first_id = ID_BLOCK.search(chat.say("destination: Paris")).group(1)
    chat.model = "month-calendar"
    chat.say("year: 2026")
    chat.model = "trip-planner"
    reply = chat.say("budget: 2000")
    assert ID_BLOCK.search(reply) is None   # the block is shown once, when a conversation starts
    assert "Understood budget: 2000" in reply and "destination" not in answer_of(reply).lower()
    assert first_id in cozyopenai.find_conversation_ids(chat.messages)


def test_regenerating_a_reply_reads_the_message_again_from_the_state_before_it(start):
    server = start()
    chat = Chat(server)
    chat.say("destination: Paris")
    first = chat.say("budget: 2000")
    regenerated = ask(server, "trip-planner", chat.messages[:-1])   # the history without the last reply
    assert "Got it: budget 2000." in answer_of(first) and "Got it: budget 2000." in answer_of(regenerated)
    assert "Continuing from an earlier reply of this chat" in thinking_of(regenerated)
    assert "destination = Paris" in thinking_of(regenerated)


def test_an_edited_earlier_message_replaces_what_it_said(start):
    chat = Chat(start())
    chat.say("I want to plan a trip")
    chat.say("Paris")
    chat.say("2000")
    edited = chat.messages[:2] + [{"role": "user", "content": "Rome"}]   # Open WebUI keeps the branch up to the edit
    reply = ask(chat.server, "trip-planner", edited)
    assert "Understood destination: Rome." in thinking_of(reply)
    assert "budget" in answer_of(reply).lower() and "Paris" not in reply


def test_a_message_edited_in_place_is_read_again_with_the_turns_after_it(start):
    chat = Chat(start())
    chat.say("destination: Paris")
    chat.say("budget: 2000")
    chat.messages[0] = {"role": "user", "content": "destination: Rome"}   # a client that edits without branching
    reply = chat.say("travel dates: May")
    assert "Running trip-planner with destination = Rome, budget = 2000, travel dates = May" in reply


def planned_trip(server):
    chat = OpenWebUIChat(server)
    chat.say("destination: Rome\nbudget: 2000")
    plan = chat.say("10 to 17 October")
    assert "## Your trip to Rome" in plan
    return chat


def test_suggest_a_change_holds_in_every_later_turn_though_the_client_drops_the_instruction(start):
    chat = planned_trip(start())
    lisbon, _ = chat.send(chat.messages + [{"role": "user", "content": "make it Lisbon instead"}])
    assert answer_of(lisbon).startswith("Changed the destination from Rome to Lisbon.")
    chat.messages[-1] = {"role": "assistant", "content": open_webui_history(lisbon)}   # shown in place of the plan
    reply = chat.say("pace: relaxed")   # sent after the Lisbon plan, without "make it Lisbon instead"
    assert "Running trip-planner with destination = Lisbon, budget = 2000, travel dates = 10 to 17 October, " \
           "pace = relaxed" in reply
    assert "edited" not in thinking_of(reply)


def test_add_details_after_a_run_never_replaces_the_result_with_a_non_answer(start, fake_llm):
    chat = planned_trip(start())
    details, _ = chat.send(chat.messages + [{"role": "user", "content": "Add Details"}])
    assert answer_of(details) == answer_of(chat.messages[-1]["content"])   # offline: the plan again
    assert "changes no value" in thinking_of(details)
    fake_llm.extractions = {"destination: Rome\nbudget: 2000": {"destination": "Rome", "budget": 2000},
                            "10 to 17 October": {"travel_dates": "10 to 17 October"}}
    chat = OpenWebUIChat(start(llm=fake_llm.settings()))
    chat.say("destination: Rome\nbudget: 2000")
    plan = chat.say("10 to 17 October")
    concise, _ = chat.send(chat.messages + [{"role": "user", "content": "More Concise"}])
    assert answer_of(concise) == "".join(fake_llm.node_tokens)
    last_call = fake_llm.calls_of("node")[-1]["messages"]
    assert last_call[-2:] == [{"role": "assistant", "content": answer_of(plan)},
                              {"role": "user", "content": "More Concise"}]
    assert "Running trip-planner with destination = Rome" in thinking_of(concise)


def test_try_again_gives_the_same_state_and_runs_again_only_if_it_ran(start):
    chat = OpenWebUIChat(start())
    chat.say("destination: Rome\nbudget: 2000")
    question_again, _ = chat.send(chat.messages[:-1])   # regenerate the first reply
    assert "Running" not in question_again and "Got it: destination Rome and budget 2000." in question_again
    chat.say("10 to 17 October")
    plan_again, _ = chat.send(chat.messages[:-1])       # regenerate the plan
    assert "Running trip-planner with destination = Rome, budget = 2000, travel dates = 10 to 17 October" \
           in plan_again


def test_an_edit_continues_from_before_it_and_the_older_branch_keeps_its_values(start, tmp_path):
    server = start(store=str(tmp_path))
    chat = OpenWebUIChat(server)
    chat.say("destination: Rome")
    chat.say("budget: 2000")
    older = list(chat.messages)
    edited, _ = chat.send(older[:2] + [{"role": "user", "content": "budget: 3000"}])   # edit the second message
    assert "Understood budget: 3000." in edited and "Continuing from an earlier reply" in edited
    restarted = start(store=str(tmp_path))   # a restart keeps every branch
    reply = ask(restarted, "trip-planner", older + [{"role": "user", "content": "travel dates: May"}])
    assert "Running trip-planner with destination = Rome, budget = 2000, travel dates = May" in reply
    assert "3000" not in reply


def test_a_reply_pasted_into_another_chat_never_changes_the_original(start):
    server = start()
    original = OpenWebUIChat(server)
    first = original.say("destination: Paris\nbudget: 2000")
    assert ID_BLOCK.search(first)
    other = OpenWebUIChat(server)
    other.messages = [{"role": "user", "content": "look at this"}, original.messages[-1]]   # pasted, id block and all
    pasted = other.say("destination: Oslo")
    assert "Paris" not in thinking_of(pasted) and "2000" not in thinking_of(pasted)
    reply = original.say("travel dates: May")
    assert "Running trip-planner with destination = Paris, budget = 2000, travel dates = May" in reply


####################################################################################
# Serving a turn over HTTP: streams, keep-alives, keys
####################################################################################

def test_a_silent_stream_gets_keepalive_comments_that_clients_skip(start):
    nodes = [{"id": "nap", "type": "python", "inputs": {"function": "time:sleep", "0": {"query": "seconds"}}},
             {"id": "answer", "type": "output", "inputs": {"text": "rested"}}]
    queries = {"seconds": {"description": "How long to sleep.", "type": "number"}}
    server = start([workflow(nodes=nodes, query_inputs=queries)], keepalive_seconds=0.05)
    response = server.post({"model": "echo", "stream": True,
                            "messages": [{"role": "user", "content": "seconds: 0.4"}]})
    assert ": keep-alive" in response.text.splitlines()
    assert answer_of(Chat(server, "echo", stream=True).say("seconds: 0.3")).endswith("rested")


def test_each_request_is_logged_on_one_line_with_model_conversation_status_and_duration(start, caplog):
    caplog.set_level("INFO", logger="cozyopenai")
    reply = Chat(start(), stream=True).say("destination: Paris")
    short_id = ID_BLOCK.search(reply).group(1)[:6]
    deadline = time.monotonic() + 5   # a stream's line is written once the server has sent its last byte
    while not (lines := [r.getMessage() for r in caplog.records
                         if r.getMessage().startswith("POST /openai/chat/completions")]):
        assert time.monotonic() < deadline, "no log line for the request"
        time.sleep(0.01)
    assert re.fullmatch(rf"POST /openai/chat/completions model=trip-planner conversation={re.escape(short_id)} "
                        r"status=200 \d+ ms", lines[-1])


def test_the_log_line_formatter_writes_what_the_standard_formatter_writes():
    # LogLineFormatter writes the line of logging.Formatter(LOG_FORMAT) its own shorter way: the
    # two must never differ, whatever the message, its arguments, the time, or a traceback.
    from hypothesis import given, settings, strategies as st
    ours, standard = cozyopenai.LogLineFormatter(), logging.Formatter(cozyopenai.LOG_FORMAT)
    try:
        raise ValueError("boom")
    except ValueError:
        failure = sys.exc_info()

    @settings(max_examples=200, deadline=None, database=None, derandomize=True)
    @given(message=st.text(max_size=20), argument=st.one_of(st.none(), st.text(max_size=8), st.integers()),
           created=st.floats(min_value=0, max_value=4e9), level=st.sampled_from([logging.INFO, logging.WARNING]),
           traceback=st.booleans(), stack=st.booleans())
    def check(message, argument, created, level, traceback, stack):
        def record():
            made = logging.LogRecord("cozyopenai", level, __file__, 1, message.replace("%", "%%") + " %s",
                                     (argument,), failure if traceback else None, sinfo="Stack:\n  here" if stack else None)
            made.created, made.msecs = created, int((created - int(created)) * 1000) + 0.0
            return made
        assert ours.format(record()) == standard.format(record())
        assert ours.format(record()) == ours.format(record())   # the second's text, kept, is the same text
    check()


@pytest.mark.parametrize("line_buffering", [True, False])
def test_the_log_line_handler_leaves_each_line_readable_at_once_on_a_buffered_or_line_buffered_stream(line_buffering):
    # The handler skips its flush where the stream's own line buffering has flushed the line:
    # a reader at the other end of a pipe (a log collector) must see every line as it is logged.
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    stream = io.TextIOWrapper(io.BufferedWriter(io.FileIO(write_end, "w")), line_buffering=line_buffering)
    handler = cozyopenai.log_line_handler(stream)
    try:
        for number in range(3):
            handler.handle(logging.LogRecord("cozyopenai", logging.INFO, __file__, 1, "line %d", (number,), None))
            assert os.read(read_end, 4096).decode().endswith(f" INFO line {number}\n")
    finally:
        stream.close()
        os.close(read_end)


def test_the_log_line_handler_writes_stderrs_lines_itself_on_a_file_a_pipe_and_a_line_buffered_stream(tmp_path):
    # Python's stderr writes through to its file when it is not a terminal: the handler's one
    # system call outside its lock must be taken there too, where a server's log usually goes.
    probe = ("import sys, io, cozyopenai; h = cozyopenai.log_line_handler(); "
             "print(h._writes_whole_lines(), cozyopenai.log_line_handler(io.StringIO())._writes_whole_lines(), "
             "cozyopenai.log_line_handler(open(sys.argv[1], 'w'))._writes_whole_lines())")
    for stderr in (open(tmp_path / "stderr", "w"), subprocess.PIPE):
        run = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "buffered")], cwd=HERE, stdout=subprocess.PIPE,
                             stderr=stderr, text=True, timeout=30)
        assert run.stdout.split() == ["True", "False", "False"], run   # a StringIO, a buffered file: the standard way


@pytest.mark.parametrize("encoding, newline, line_buffering", [
    ("utf-8", None, False), ("utf-16", None, False), ("utf-8-sig", None, True), ("utf-16", "\r\n", False),
    ("utf-8", "\r\n", True)])
def test_the_log_line_handler_writes_the_bytes_the_standard_handler_writes(tmp_path, encoding, newline, line_buffering):
    # Writing outside the lock must not change a byte: a stateful encoding's byte-order mark
    # comes once, and the stream's own line endings apply (stderr's on Windows are CRLF).
    written = {}
    for name, make_handler in (("standard", logging.StreamHandler), ("ours", cozyopenai.log_line_handler)):
        raw = io.FileIO(tmp_path / name, "w")
        stream = (io.TextIOWrapper(io.BufferedWriter(raw), encoding=encoding, newline=newline, line_buffering=True)
                  if line_buffering else io.TextIOWrapper(raw, encoding=encoding, newline=newline, write_through=True))
        handler = make_handler(stream)
        handler.setFormatter(cozyopenai.LogLineFormatter())
        stream.write("plain ü\n")
        for number in range(3):
            record = logging.LogRecord("cozyopenai", logging.INFO, __file__, 1, "line %d é", (number,), None)
            record.created, record.msecs = 1_700_000_000.25, 250.0
            handler.handle(record)
            assert os.path.getsize(tmp_path / name) > 0   # out at once, before any flush or close
        stream.close()
        written[name] = (tmp_path / name).read_bytes()
    assert written["ours"] == written["standard"]
    assert written["ours"].decode(encoding).count("\ufeff") == 0   # the mark, if any, is the decoder's to drop


@pytest.mark.parametrize("kind", ["line-buffered", "write-through"])
def test_log_lines_of_many_threads_at_once_come_out_whole_and_none_is_lost(kind):
    # Where the stream keeps nothing back the handler writes each line in one system call,
    # outside its lock: lines of threads logging at once must neither mix nor go missing.
    read_end, write_end = os.pipe()
    stream = (io.TextIOWrapper(io.BufferedWriter(io.FileIO(write_end, "w")), line_buffering=True)
              if kind == "line-buffered" else io.TextIOWrapper(io.FileIO(write_end, "w"), write_through=True))
    handler = cozyopenai.log_line_handler(stream)
    chunks = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: os.read(read_end, 65536), b"")))
    reader.start()

    def log_lines(thread):
        for number in range(200):
            handler.handle(logging.LogRecord("cozyopenai", logging.INFO, __file__, 1, "thread %d line %d %s",
                                             (thread, number, "x" * 300), None))
    threads = [threading.Thread(target=log_lines, args=(thread,)) for thread in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
        assert not thread.is_alive(), "a logging thread did not finish"
    stream.close()
    reader.join(timeout=30)
    os.close(read_end)
    lines = b"".join(chunks).decode().splitlines()
    assert len(lines) == 8 * 200
    assert all(re.fullmatch(r"\S+ \S+ INFO thread \d line \d+ x{300}", line) for line in lines)
    assert {line.split()[4] + " " + line.split()[6] for line in lines} == {
        f"{thread} {number}" for thread in range(8) for number in range(200)}


def test_a_long_history_well_over_bottles_100kb_default_is_accepted(start):
    history = [{"role": "user", "content": "x" * 50_000}, {"role": "assistant", "content": "y" * 50_000},
               {"role": "user", "content": "destination: Paris"}]
    response = start().post({"model": "trip-planner", "messages": history})
    assert response.status_code == 200


def test_with_api_keys_every_openai_route_needs_one(start):
    server = start(api_keys=["key-one", "key-two"])
    for method, path in (("GET", "/openai/models"), ("GET", "/openai/models/trip-planner"),
                         ("POST", "/openai/chat/completions")):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "key-one"}):
            response = requests.request(method, server.url + path, headers=headers, timeout=5,
                                        json={"model": "trip-planner", "messages": [{"role": "user", "content": "x"}]})
            assert response.status_code == 401
            assert response.json()["error"]["code"] == "invalid_api_key"
    client = OpenAI(api_key="key-two", base_url=server.url + "/openai")
    assert [model.id for model in client.models.list()][0] == "trip-planner"
    assert requests.get(server.url + "/health", timeout=5).status_code == 200


def test_a_streamed_turn_shows_its_first_thinking_lines_before_the_llm_has_answered(start, fake_llm):
    fake_llm.gate = threading.Event()   # the fake answers nothing until the test has read those lines
    fake_llm.extractions = {"A trip to Paris.": {"destination": "Paris"}}
    server = start(llm=fake_llm.settings())
    try:
        chunks = server.client.chat.completions.create(model="trip-planner", stream=True,
                                                       messages=[{"role": "user", "content": "A trip to Paris."}])
        shown = ""
        for chunk in chunks:
            shown += chunk.choices[0].delta.content or "" if chunk.choices else ""
            if "Found so far" in shown:   # what the simple reader decided, before the LLM's reading
                break
        assert fake_llm.answered == 0 and "Reading your message for the destination" in shown
        assert "Found so far: destination Paris (the language model is reading it too)." in shown
        fake_llm.gate.set()
        rest = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
        assert "Understood destination: Paris." in rest and fake_llm.answered == 1
    finally:
        fake_llm.gate.set()


def test_a_single_api_key_given_as_a_string_is_one_key(start):
    server = start(api_keys="key-one")
    assert requests.get(server.url + "/openai/models", headers={"Authorization": "Bearer k"}, timeout=5).status_code == 401
    assert requests.get(server.url + "/openai/models", headers={"Authorization": "Bearer key-one"},
                        timeout=5).status_code == 200


####################################################################################
# Chat Completions
####################################################################################

def test_model_list_has_the_documents_model_objects(start):
    server = start()
    body = requests.get(server.url + "/openai/models", timeout=5).json()
    assert body["object"] == "list"
    names = [model["id"] for model in body["data"]]
    assert names == list(cozyopenai.load_workflows(WORKFLOWS_PATH))
    for model in body["data"]:
        assert set(model) == {"id", "object", "created", "owned_by"}
        assert model["object"] == "model" and model["owned_by"] == "cozyui" and isinstance(model["created"], int)
    assert [m.id for m in server.client.models.list()] == names


def test_one_model_by_id_and_an_unknown_one_is_404(start):
    server = start()
    assert server.client.models.retrieve("trip-planner").owned_by == "cozyui"
    response = requests.get(server.url + "/openai/models/nope", timeout=5)
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"


def test_streamed_reply_is_chunks_with_role_first_then_content_stop_and_done(start):
    server = start()
    response = server.post({"model": "trip-planner", "stream": True,
                            "messages": [{"role": "user", "content": "I want to plan a trip to Paris."}]},
                           stream=True)
    assert response.headers["Content-Type"].startswith("text/event-stream")
    lines = [line for line in response.iter_lines(decode_unicode=True) if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "trip-planner" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text.startswith("<thinking>\n")


def test_include_usage_adds_a_usage_chunk_before_done(start):
    server = start()
    chunks = list(server.client.chat.completions.create(
        model="trip-planner", messages=[{"role": "user", "content": "hello"}], stream=True,
        stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens > 0
    assert all(chunk.usage is None for chunk in chunks[:-1])


def test_non_streamed_reply_is_one_chat_completion_with_usage(start):
    server = start()
    response = server.post({"model": "trip-planner", "messages": [{"role": "user", "content": "hello"}]})
    assert response.headers["Content-Type"] == "application/json"
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["role"] == "assistant" and body["choices"][0]["finish_reason"] == "stop"
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0


def test_progress_can_go_to_the_reasoning_content_field(start):
    server = start(thinking="reasoning_content")
    body = {"model": "trip-planner", "messages": [{"role": "user", "content": "destination: Paris"}]}
    message = server.post(body).json()["choices"][0]["message"]
    assert "Understood destination: Paris." in message["reasoning_content"]
    assert "<thinking>" not in message["content"] and "What is your total budget" in message["content"]
    chunks = [json.loads(line[6:]) for line in server.post({**body, "stream": True}).text.splitlines()
              if line.startswith("data: {")]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert any("reasoning_content" in d for d in deltas) and not any("<thinking>" in d.get("content", "") for d in deltas)


def test_a_reply_sent_whole_has_the_same_text_as_its_streamed_fields():
    # whole_reply joins a reply without reply_fields' generator: the two must never differ.
    from hypothesis import given, settings, strategies as st
    pieces = st.lists(st.builds(cozyopenai.Piece, st.sampled_from(["thinking", "answer"]), st.text(max_size=5)),
                      max_size=8)

    @settings(max_examples=100, deadline=None, database=None, derandomize=True)   # a second or so
    @given(pieces=pieces, thinking=st.sampled_from(cozyopenai.THINKING_STYLES))
    def check(pieces, thinking):
        joined = {"content": "", "reasoning_content": None}
        for field_name, text in cozyopenai.reply_fields(iter(pieces), thinking):
            joined[field_name] = (joined[field_name] or "") + text
        assert cozyopenai.whole_reply(pieces, thinking) == joined
    check()


def test_a_whole_reply_is_the_json_of_its_completion_object():
    # completion_text writes the chat.completion object out, not through json_text: the text
    # must be json_text's for the object it holds, to the byte, and hold what it always held.
    from hypothesis import given, settings, strategies as st

    @settings(max_examples=100, deadline=None, database=None, derandomize=True)
    @given(content=st.text(), reasoning=st.none() | st.text(), model=st.text(min_size=1),
           prompt_tokens=st.integers(0, 10 ** 6))
    def check(content, reasoning, model, prompt_tokens):
        request = cozyopenai.new_chat_request((model, [], False, False, prompt_tokens))
        text = cozyopenai.completion_text({"content": content, "reasoning_content": reasoning}, request, prompt_tokens)
        reply = json.loads(text)
        assert cozyopenai.json_text(reply) == text
        message = {"role": "assistant", "content": content, "refusal": None}
        if reasoning is not None:
            message["reasoning_content"] = reasoning
        completion = cozyopenai.tokens_of_chars(len(content) + len(reasoning or ""))
        assert re.fullmatch(r"chatcmpl-[0-9a-f]{24}", reply["id"]) and isinstance(reply["created"], int)
        assert reply == {"id": reply["id"], "object": "chat.completion", "created": reply["created"], "model": model,
                         "system_fingerprint": None,
                         "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}],
                         "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                                   "total_tokens": prompt_tokens + completion}}
    check()


def test_streamed_chunks_are_the_json_of_their_objects():
    # completion_chunks writes its chunks out, not through json_text: each must be json_text's
    # text of the chunk object it holds, to the byte, and hold what it always held.
    from hypothesis import given, settings, strategies as st
    fields = st.lists(st.none() | st.tuples(st.sampled_from(["content", "reasoning_content"]), st.text()), max_size=5)

    @settings(max_examples=100, deadline=None, database=None, derandomize=True)
    @given(fields=fields, model=st.text(min_size=1), include_usage=st.booleans())
    def check(fields, model, include_usage):
        request = cozyopenai.new_chat_request((model, [], True, include_usage, 3))
        events = list(cozyopenai.completion_chunks(iter(fields), request, 3))
        assert events[-1] == b"data: [DONE]\n\n"
        chunks = [event[6:-2].decode() for event in events if event.startswith(b"data: {")]
        objects = [json.loads(text) for text in chunks]
        if include_usage:   # the usage chunk is json.dumps's
            assert objects.pop()["choices"] == [] and chunks.pop()
        for text, chunk in zip(chunks, objects):
            assert cozyopenai.json_text(chunk) == text
        deltas = [{"role": "assistant", "content": ""}] + [{name: text} for name, text in filter(None, fields) if text] + [{}]
        first = objects[0]
        assert re.fullmatch(r"chatcmpl-[0-9a-f]{24}", first["id"]) and isinstance(first["created"], int)
        assert objects == [dict({"id": first["id"], "object": "chat.completion.chunk", "created": first["created"],
                                 "model": model, "system_fingerprint": None,
                                 "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                              "finish_reason": None if delta else "stop"}]},
                                **({"usage": None} if include_usage else {})) for delta in deltas]
        assert events.count(b": keep-alive\n\n") == fields.count(None)
    check()


def test_a_response_is_the_json_of_its_response_object():
    # response_text writes response_object out, not through json_text: the two must give the
    # same text, to the byte, for whatever a stored response holds.
    from hypothesis import given, settings, strategies as st
    optional = {"status": st.sampled_from(["completed", "in_progress", "failed", "cancelled", "incomplete"]),
                "thinking": st.text(), "answer": st.text(), "created_at": st.integers(0, 2 ** 40),
                "prompt_tokens": st.integers(0, 10 ** 6), "previous_response_id": st.none() | st.text(),
                "conversation": st.none() | st.text(), "background": st.booleans(),
                "instructions": st.none() | st.text(), "metadata": st.none() | st.dictionaries(st.text(), st.text()),
                "store": st.booleans(), "error": st.none() | st.fixed_dictionaries({"code": st.text(), "message": st.text()}),
                "truncation": st.sampled_from(["auto", "disabled"])}

    @settings(max_examples=200, deadline=None, database=None, derandomize=True)
    @given(stored=st.fixed_dictionaries({}, optional=optional), model=st.text(min_size=1),
           status=st.sampled_from(["completed", "in_progress", "failed"]))
    def check(stored, model, status):
        response_id = "resp_" + "a1" * 20
        stored = dict(stored, created_at=stored.get("created_at", 7))   # the same time in both
        assert cozyopenai.response_text(response_id, model, stored, status) == cozyopenai.json_text(
            cozyopenai.response_object(response_id, model, stored, status))
    check()


def test_text_parts_in_content_are_read_like_a_string(start):
    reply = ask(start(), "month-calendar", [{"role": "user", "content": [
        {"type": "text", "text": "year: 2026"}, {"type": "text", "text": "month: 1"}]}])
    assert "January 2026" in answer_of(reply)


def test_a_deeply_nested_body_is_refused_with_a_400(start):
    server = start()
    response = requests.post(server.url + "/openai/chat/completions", data="[" * 5000 + "]" * 5000,
                             headers={"Content-Type": "application/json"}, timeout=10)
    assert response.status_code == 400 and response.json()["error"]["message"] == "The request body is nested too deeply."


def _raw_post(server, data, headers=None, method="POST", path="/openai/chat/completions"):
    return requests.request(method, server.url + path, data=data, timeout=10,
                            headers=headers or {"Content-Type": "application/json"})


ERROR_CASES = {
    "malformed JSON": (dict(data=b'{"model": "trip-planner", "messages": ['), 400, None),
    "not an object": (dict(data=b'[1, 2]'), 400, None),
    "messages missing": (dict(data=b'{"model": "trip-planner"}'), 400, "messages"),
    "messages empty": (dict(data=b'{"model": "trip-planner", "messages": []}'), 400, "messages"),
    "message without role": (dict(data=b'{"model": "trip-planner", "messages": [{"content": "x"}]}'), 400,
                             "messages[0].role"),
    "stream not a boolean": (dict(data=b'{"model": "trip-planner", "stream": "yes", '
                                       b'"messages": [{"role": "user", "content": "x"}]}'), 400, "stream"),
    "unknown model": (dict(data=b'{"model": "nope", "messages": [{"role": "user", "content": "x"}]}'), 404,
                      "model"),
    "wrong method": (dict(data=None, method="GET"), 405, None),
    "unknown route": (dict(data=None, method="GET", path="/openai/nothing"), 404, None),
    "body too large": (dict(data=b" " * (cozyopenai.MAX_BODY_BYTES + 1)), 413, None),
    "form content type": (dict(data=b"model=trip-planner", headers={"Content-Type": "application/x-www-form-urlencoded"}),
                          415, None),
    "n above one": (dict(data=b'{"model": "trip-planner", "n": 2, "messages": [{"role": "user", "content": "x"}]}'),
                    400, "n"),
    "messages not a list": (dict(data=b'{"model": "trip-planner", "messages": "hello"}'), 400, "messages"),
    "content a number": (dict(data=b'{"model": "trip-planner", "messages": [{"role": "user", "content": 5}]}'), 400,
                         "messages[0].content"),
    "image content": (dict(data=json.dumps({"model": "trip-planner", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:,"}}]}]}).encode()), 400, "messages[0].content"),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_errors_are_openai_error_objects_with_the_right_status(start, case):
    arguments, status, param = ERROR_CASES[case]
    response = _raw_post(start(), **arguments)
    assert response.status_code == status
    assert response.headers["Content-Type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["message"] and error["param"] == param
    if case == "unknown model":
        assert error["code"] == "model_not_found"


def test_the_openai_client_raises_its_not_found_error_for_an_unknown_model(start):
    import openai
    with pytest.raises(openai.NotFoundError):
        start().client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])


def test_the_async_openai_client_gets_a_plain_and_a_streamed_reply(start):
    import asyncio
    from openai import AsyncOpenAI
    server = start()

    async def talk():
        client = AsyncOpenAI(api_key="unused", base_url=server.url + "/openai/v1")
        plain = await client.chat.completions.create(
            model="trip-planner", messages=[{"role": "user", "content": "destination: Paris"}])
        stream = await client.chat.completions.create(
            model="trip-planner", messages=[{"role": "user", "content": "destination: Rome"}], stream=True)
        streamed = "".join([chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices])
        await client.close()
        return plain.choices[0].message.content, streamed
    plain, streamed = asyncio.run(talk())
    assert "Understood destination: Paris." in plain and "Understood destination: Rome." in streamed


def _bodies():
    from hypothesis import strategies as st
    scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
    anything = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) |
                            st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)
    part = st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", "x"]), "text": anything})
    message = st.fixed_dictionaries({}, optional={
        "role": st.sampled_from(["user", "assistant", "system", "tool", "nobody"]) | anything,
        "content": st.text(max_size=80) | st.lists(part, max_size=2) | anything,
        "name": st.text(max_size=5)})
    plausible = st.fixed_dictionaries({
        "model": st.sampled_from(["trip-planner", "month-calendar"]),
        "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system"]),
                                                    "content": st.text(max_size=60)}), min_size=1, max_size=4)},
        optional={"stream": st.booleans(), "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
                  "n": st.sampled_from([1, None]), "tools": anything, "user": st.text(max_size=8)})
    request = plausible | st.fixed_dictionaries({}, optional={
        "model": st.sampled_from(["trip-planner", "month-calendar", "nope", ""]) | anything,
        "messages": st.lists(message, max_size=4) | anything,
        "stream": st.booleans() | anything, "n": st.integers(-2, 5) | anything,
        "stream_options": st.fixed_dictionaries({"include_usage": anything}) | anything,
        "tools": anything, "temperature": anything})
    return (request.map(lambda body: json.dumps(body).encode())
            | anything.map(lambda body: json.dumps(body).encode()) | st.binary(max_size=64))


def _headers():
    from hypothesis import strategies as st
    header_text = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=30).map(str.strip)
    return st.fixed_dictionaries({}, optional={
        "Content-Type": st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded",
                                         "multipart/form-data; boundary=x", "application/json; charset=utf-8",
                                         "application/json", "application/json"]) | header_text,
        "Authorization": header_text, "Accept": header_text, "X-Anything": header_text})


FUZZED_REQUESTS = 1000


def test_fuzzed_requests_get_no_5xx_and_only_openai_errors(start, capsys):
    from hypothesis import HealthCheck, given, settings
    server, session, seen = start(), requests.Session(), []

    @settings(max_examples=FUZZED_REQUESTS, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(body=_bodies(), headers=_headers())
    def check(body, headers):
        response = session.post(server.url + "/openai/chat/completions", data=body, headers=headers, timeout=10)
        seen.append(response.status_code)
        assert response.status_code < 500, response.text
        if response.status_code >= 400:
            assert response.headers["Content-Type"] == "application/json"
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["message"]
            assert not PYTHON_TYPE_NAME.search(error["message"]), error["message"]
        elif response.headers["Content-Type"].startswith("text/event-stream"):
            assert response.text.endswith("data: [DONE]\n\n")
        else:
            assert response.json()["object"] == "chat.completion"
    check()
    assert len(seen) >= FUZZED_REQUESTS
    assert "Where would you like to go?" in Chat(server).say("I want to plan a trip.")
    with capsys.disabled():
        counts = {status: seen.count(status) for status in sorted(set(seen))}
        print(f"\n[fuzz] {len(seen)} requests, statuses {counts}")


OPEN_WEBUI_TOOLS = [{"type": "function", "function": {"name": name, "description": "built-in",
                                                      "parameters": {"type": "object", "properties": {}}}}
                    for name in ("search_web", "fetch_url", "query_knowledge_files", "get_current_timestamp")]


def test_a_replay_of_open_webuis_requests_continues_the_chat_and_answers_its_title_task(start):
    server = start()
    messages = [{"role": "user", "content": "I want to plan a trip to Paris."}]

    def turn(text):
        messages.append({"role": "user", "content": text})
        body = {"model": "trip-planner", "messages": messages, "stream": True, "tools": OPEN_WEBUI_TOOLS,
                "tool_choice": "auto", "stream_options": {"include_usage": True}, "metadata": {"chat_id": "x"}}
        lines = server.post(body, stream=True).iter_lines(decode_unicode=True)
        chunks = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
        reply = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
        messages.append({"role": "assistant", "content": open_webui_history(reply)})
        return reply
    messages.pop()
    first = turn("I want to plan a trip to Paris.")
    assert messages[-1]["content"].endswith("```") and "<thinking>" not in messages[-1]["content"]
    history = "\n".join(f"{m['role'].upper()}: {m['content']}" for m in messages)
    title_task = ("### Task:\nGenerate a concise, 3-5 word title with an emoji summarizing the chat history.\n"
                  "### Output:\nJSON format: { \"title\": \"your concise title here\" }\n"
                  f"### Chat History:\n<chat_history>\n{history}\n</chat_history>")
    response = server.post({"model": "trip-planner", "stream": False,
                            "messages": [{"role": "user", "content": title_task}]})
    title = json.loads(response.json()["choices"][0]["message"]["content"])
    assert title == {"title": "Trip planner: I want to plan a trip to Paris"}
    follow_ups = server.post({"model": "trip-planner", "messages": [{"role": "user", "content": title_task.replace(
        '{ "title": "your concise title here" }', '{ "follow_ups": ["Question 1?"] }')}]}).json()
    assert json.loads(follow_ups["choices"][0]["message"]["content"]) == {   # the budget has no choices to offer
        "follow_ups": ["Make the pace relaxed", "Make the pace packed", "With kids"]}
    streamed = server.post({"model": "trip-planner", "stream": True, "messages": [{"role": "user", "content": title_task}]})
    assert '\\"title\\"' in streamed.text and streamed.text.rstrip().endswith("data: [DONE]")
    assert "Got it: destination Paris." in first
    turn("2000")
    last = turn("travel_dates: May")
    assert "## Your trip to Paris" in last and ID_BLOCK.search(last) is None


def test_continue_response_adds_nothing_and_changes_nothing(start):
    server = start()
    chat = Chat(server)
    chat.say("destination: Paris")
    continued = server.post({"model": "trip-planner", "messages": chat.messages})
    assert continued.status_code == 200 and continued.json()["choices"][0]["message"]["content"] == ""
    streamed = server.post({"model": "trip-planner", "messages": chat.messages, "stream": True})
    assert streamed.text.rstrip().endswith("data: [DONE]")   # the stream ends (Open WebUI waited forever)
    assert "Got it: budget 2000." in answer_of(chat.say("budget: 2000"))


def test_a_background_task_is_answered_through_the_llm_when_there_is_one(start, fake_llm):
    fake_llm.node_tokens = ['{"title": "🗼 Paris Trip Planning"}']
    server = start(llm=fake_llm.settings())
    task = '### Task:\nGenerate a title.\n### Output:\nJSON format: { "title": "..." }\nUSER: Paris please'
    reply = ask(server, "trip-planner", [{"role": "user", "content": task}])
    assert json.loads(reply) == {"title": "🗼 Paris Trip Planning"}
    assert fake_llm.calls_of("extraction") == []          # no conversation, no gathering


def _task(history, key, example):
    chat = "\n".join(f"{m['role'].upper()}: {m['content']}" for m in history)
    return {"role": "user", "content": f"### Task:\nSuggest what the user might say next.\n### Output:\nJSON format: "
                                       f'{{ "{key}": {example} }}\n### Chat History:\n<chat_history>\n{chat}\n</chat_history>'}


def test_follow_ups_and_tags_come_from_the_workflow_and_what_the_user_gave(start, fake_llm):
    chat = Chat(start())
    task = lambda key: json.loads(ask(chat.server, "trip-planner", [_task(chat.messages, key, '["..."]')]))[key]
    chat.say("destination: Lisbon\nbudget: 900\ntravel dates: May\npace: relaxed")
    assert task("follow_ups") == ["pace: balanced", "pace: packed", "With kids", "Run it again"]
    assert task("tags") == ["Trip planner", "Lisbon", "relaxed"]
    for suggestion, change in (("With kids", "children = yes"), ("pace: packed", "pace = packed")):
        reply = chat.say(suggestion)   # a suggestion, sent as it is, is read
        assert "Running trip-planner with destination = Lisbon" in reply and change in reply
    assert task("follow_ups") == ["pace: relaxed", "pace: balanced", "children: no", "Run it again"]
    calendar = Chat(chat.server, "month-calendar")
    calendar.say("year: 2026")
    assert json.loads(ask(chat.server, "month-calendar", [_task(calendar.messages, "follow_ups", "[]")])) == {
        "follow_ups": ["January", "February", "March"]}   # the ways to answer the question asked
    # With an LLM, in the user's language: checked, and the offline ones when a check fails.
    french = Chat(start(llm=fake_llm.settings()))
    fake_llm.question = ""
    french.say("Je voudrais partir à Lisbonne avec un budget de 900 euros.")
    fake_llm.follow_ups = ["Un rythme tranquille", "Un rythme chargé", "Avec les enfants"]
    asked = lambda: json.loads(ask(french.server, "trip-planner", [_task(french.messages, "follow_ups", "[]")]))
    assert asked() == {"follow_ups": fake_llm.follow_ups}
    fake_llm.follow_ups = ["Un rythme tranquille", "<|im_start|>", "Avec les enfants à Tokyo"]
    assert asked() == {"follow_ups": ["Make the pace relaxed", "Make the pace packed", "With kids"]}


####################################################################################
# The Responses API
####################################################################################

DOCUMENT_TURNS = ("I want to plan a trip to Paris.", "budget: 2000", "a week in mid-October")


def test_the_responses_api_runs_the_document_conversation_chained_by_previous_response_id(start):
    client = start().client
    first = client.responses.create(model="trip-planner", input=DOCUMENT_TURNS[0])
    assert first.id.startswith("resp_") and first.object == "response" and first.status == "completed"
    assert [item.type for item in first.output] == ["reasoning", "message"]
    assert "Understood destination: Paris." in first.output[0].summary[0].text
    assert first.output_text.startswith("Got it: destination Paris.") and "<thinking>" not in first.output_text
    assert "cozyui-conversation-identifier" not in first.output_text   # the response id carries the conversation
    second = client.responses.create(model="trip-planner", input=DOCUMENT_TURNS[1], previous_response_id=first.id,
                                     metadata={"user": "u1"})
    assert second.output_text.startswith("Got it: budget 2000.") and second.metadata == {"user": "u1"}
    with client.responses.stream(model="trip-planner", input=DOCUMENT_TURNS[2],
                                 previous_response_id=second.id) as stream:
        events = [event for event in stream]
        final = stream.get_final_response()
    kinds = [event.type for event in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert [event.sequence_number for event in events] == list(range(len(events)))
    assert kinds.index("response.reasoning_summary_text.delta") < kinds.index("response.output_text.delta")
    progress = "".join(e.delta for e in events if e.type == "response.reasoning_summary_text.delta")
    assert "→ plan started" in progress and "Running trip-planner with destination = Paris, budget = 2000" in progress
    assert final.output_text.startswith("## Your trip to Paris") and "a week in mid-October" in final.output_text
    assert client.responses.retrieve(second.id).output_text == second.output_text


def test_two_responses_that_continue_the_same_one_each_get_their_own_state(start):
    client = start().client
    first = client.responses.create(model="trip-planner", input="destination: Rome\nbudget: 2000")
    lisbon = client.responses.create(model="trip-planner", input="destination: Lisbon", previous_response_id=first.id)
    may = client.responses.create(model="trip-planner", input="travel dates: May", previous_response_id=first.id)
    assert "destination = Rome" in may.output[0].summary[0].text and "Lisbon" not in may.output[0].summary[0].text
    june = client.responses.create(model="trip-planner", input="travel dates: June", previous_response_id=lisbon.id)
    assert "Running trip-planner with destination = Lisbon, budget = 2000, travel dates = June" in \
        june.output[0].summary[0].text


def test_a_stored_response_continues_from_exactly_its_own_state(start):
    client = start().client
    first = client.responses.create(model="trip-planner", input="I want to plan a trip to Paris.")
    rome = client.responses.create(model="trip-planner", input="destination: Rome", previous_response_id=first.id)
    paris_budget = client.responses.create(model="trip-planner", input="budget: 2000", previous_response_id=first.id)
    client.responses.create(model="trip-planner", input="budget: 2000", previous_response_id=rome.id)   # same text
    plan = client.responses.create(model="trip-planner", input="a week in mid-October",
                                   previous_response_id=paris_budget.id)
    assert plan.output_text.startswith("## Your trip to Paris")
    again = [client.responses.create(model="trip-planner", input="hmm", previous_response_id=first.id)
             for _ in range(3)]   # the same reply from the same state: one snapshot, no loop
    assert len({response.output_text for response in again}) == 1


PYTHON_TYPE_NAME = re.compile(r"NoneType|\b(?:a|an|not) '?(?:str|dict|list|int|float|bool|tuple)\b")


def test_errors_name_json_types_as_a_client_writes_them_on_every_route(start):
    client = start().client
    conversation = client.conversations.create().id
    texts = [{"role": "user", "content": [None]}]
    respond = partial(client.responses.create, model="trip-planner")
    chat = partial(client.chat.completions.create, model="trip-planner")
    for call, param, words in (
            (lambda: respond(input=texts), "input[0].content", "not null"),
            (lambda: respond(input="hi", previous_response_id=5), "previous_response_id",
             "'previous_response_id' must be a string, not a number."),
            (lambda: respond(input="hi", metadata=["a"]), "metadata", "not an array"),
            (lambda: respond(input="hi", extra_body={"store": "yes"}), "store",
             "'store' must be true or false, not a string."),
            (lambda: chat(messages=texts), "messages[0].content", "not null"),
            (lambda: chat(messages=[{"role": "user", "content": {"text": "hi"}}]), "messages[0].content",
             "must be a string or an array of text parts, not an object."),
            (lambda: chat(messages="hi"), "messages", "not a string"),
            (lambda: chat(messages=[{"role": "user", "content": "hi"}], extra_body={"stream_options": [1]}),
             "stream_options", "'stream_options' must be an object, not an array."),
            (lambda: client.conversations.items.create(conversation, items=texts), "items[0].content", "not null")):
        with pytest.raises(openai.BadRequestError) as caught:
            call()
        assert caught.value.body["param"] == param and words in caught.value.body["message"], caught.value.body
        assert not PYTHON_TYPE_NAME.search(caught.value.body["message"]), caught.value.body


@pytest.mark.parametrize("store", ["memory", "json"])
def test_a_lone_surrogate_in_any_field_of_a_body_becomes_the_replacement_mark_and_the_turn_is_kept(start, tmp_path,
                                                                                                   store):
    # JSON may escape half a pair ("\\ud800"); UTF-8 cannot write it: saved or echoed, it was a 500.
    server = start(store=str(tmp_path) if store == "json" else "memory")
    headers = {"Content-Type": "application/json"}
    body = ('{"model": "trip-planner", "input": "destination: Paris\\udc00", "instructions": "\\ud800",'
            ' "metadata": {"note\\ud800": "v\\udfff"}}')
    reply = requests.post(server.url + "/openai/responses", data=body.encode(), headers=headers, timeout=10)
    assert reply.status_code == 200, reply.text
    assert reply.json()["metadata"] == {"note\ufffd": "v\ufffd"}
    again = requests.get(server.url + "/openai/responses/" + reply.json()["id"], timeout=10)
    assert again.status_code == 200 and again.json()["metadata"] == {"note\ufffd": "v\ufffd"}
    chat = ('{"model": "trip-planner", "user": "\\ud800", "messages": [{"role": "user", '
            '"content": "destination: Rome\\ud800"}]}')
    reply = requests.post(server.url + "/openai/chat/completions", data=chat.encode(), headers=headers, timeout=10)
    assert reply.status_code == 200 and "Understood destination: Rome." in reply.json()["choices"][0]["message"]["content"]
    pair = '{"model": "trip-planner", "messages": [{"role": "user", "content": "destination: Oslo \\ud83d\\ude00"}]}'
    reply = requests.post(server.url + "/openai/chat/completions", data=pair.encode(), headers=headers, timeout=10)
    assert reply.status_code == 200   # a pair is one character, and stays


def test_responses_and_conversations_take_metadata_by_one_rule_openais(start):
    client = start().client
    conversation = client.conversations.create().id
    routes = (lambda metadata: client.responses.create(model="trip-planner", input="hi", metadata=metadata),
              lambda metadata: client.conversations.create(metadata=metadata),
              lambda metadata: client.conversations.update(conversation, metadata=metadata))
    largest = {f"{number:02d}" + "k" * 62: "v" * 512 for number in range(16)}
    for metadata, param, words in (({"a": 5}, "metadata.a", "'metadata.a' must be a string, not a number"),
                                   ({"a": None}, "metadata.a", "not null"),
                                   (dict(largest, extra="x"), "metadata", "at most 16 keys, not 17"),
                                   ({"k" * 65: "x"}, "metadata", "keys can be at most 64 characters"),
                                   ({"a": "v" * 513}, "metadata.a", "at most 512 characters, not 513")):
        for route in routes:
            with pytest.raises(openai.BadRequestError) as caught:
                route(metadata)
            assert caught.value.body["param"] == param and words in caught.value.body["message"], caught.value.body
    assert all(route(largest).metadata == largest for route in routes)


def test_responses_errors_are_openai_errors_and_a_stateless_response_carries_the_id_block(start):
    server = start()
    with pytest.raises(openai.BadRequestError) as caught:
        server.client.responses.create(model="trip-planner", input="hello", previous_response_id="resp_unknown")
    assert caught.value.body["param"] == "previous_response_id"
    bad = requests.post(server.url + "/openai/v1/responses", timeout=10, json={
        "model": "trip-planner", "input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "input[0].content"
    missing = requests.get(server.url + "/openai/responses/resp_nothing", timeout=10)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    first = server.client.responses.create(model="trip-planner", input="destination: Oslo", store=False)
    assert ID_BLOCK.search(first.output_text)   # stateless: the id block carries the conversation, as in chat
    history = [{"role": "user", "content": "destination: Oslo"}, {"role": "assistant", "content": first.output_text},
               {"role": "user", "content": "budget: 900\ntravel dates: May"}]
    again = server.client.responses.create(model="trip-planner", input=history, store=False)
    assert "Running trip-planner with destination = Oslo, budget = 900, travel dates = May" in \
        again.output[0].summary[0].text
    stored = server.client.responses.create(model="trip-planner", input="destination: Bergen")
    server.client.responses.delete(stored.id)
    assert requests.get(f"{server.url}/openai/responses/{stored.id}", timeout=10).status_code == 404


def test_a_trip_planned_in_three_turns_through_a_conversation_keeps_every_item_in_it(start):
    client = start().client
    conversation = client.conversations.create(metadata={"topic": "trip"})
    assert conversation.id.startswith("conv_") and conversation.object == "conversation"
    outputs = [client.responses.create(model="trip-planner", input=text, conversation=conversation.id)
               for text in DOCUMENT_TURNS]
    assert outputs[0].output_text.startswith("Got it: destination Paris.")
    assert outputs[1].output_text.startswith("Got it: budget 2000.")
    assert outputs[2].output_text.startswith("## Your trip to Paris") and outputs[2].conversation.id == conversation.id
    items = list(client.conversations.items.list(conversation.id, order="asc", limit=4))   # three pages
    assert [(item.type, getattr(item, "role", None)) for item in items] == \
        [("message", "user"), ("reasoning", None), ("message", "assistant")] * 3
    assert items[0].content[0].text == DOCUMENT_TURNS[0] and items[-1].id == outputs[2].output[-1].id
    newest = client.conversations.items.list(conversation.id, limit=2)
    assert [item.id for item in newest.data] == [items[-1].id, items[-2].id] and newest.has_more
    assert client.conversations.retrieve(conversation.id).metadata == {"topic": "trip"}
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model="trip-planner", input="hi", conversation=conversation.id,
                                previous_response_id=outputs[0].id)
    assert caught.value.body["param"] == "conversation" and "previous_response_id" in caught.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="trip-planner", input="hi", conversation="conv_" + "x" * 32)


def test_a_trip_planned_through_the_conversations_apis_items_and_its_changes_are_kept(start):
    client = start().client
    conversation = client.conversations.create(items=[
        {"type": "message", "role": "user", "content": DOCUMENT_TURNS[0]}])
    answers = [client.responses.create(model="trip-planner", conversation=conversation.id).output_text]
    for text in DOCUMENT_TURNS[1:]:
        added = client.conversations.items.create(conversation.id, items=[
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}])
        assert added.data[0].content[0].text == text
        answers.append(client.responses.create(model="trip-planner", conversation={"id": conversation.id}).output_text)
    assert answers[0].startswith("Got it: destination Paris.") and answers[1].startswith("Got it: budget 2000.")
    assert answers[2].startswith("## Your trip to Paris")
    with pytest.raises(openai.BadRequestError):   # nothing new after the last answer
        client.responses.create(model="trip-planner", conversation=conversation.id)
    first = client.conversations.items.list(conversation.id, order="asc").data[0]
    assert client.conversations.items.retrieve(first.id, conversation_id=conversation.id).id == first.id
    client.conversations.items.delete(first.id, conversation_id=conversation.id)
    with pytest.raises(openai.NotFoundError):
        client.conversations.items.retrieve(first.id, conversation_id=conversation.id)
    assert client.conversations.update(conversation.id, metadata={"a": "b"}).metadata == {"a": "b"}
    assert client.conversations.delete(conversation.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.conversations.retrieve(conversation.id)


def test_the_agents_sdk_keeps_a_three_turn_trip_in_a_conversation_by_its_id(start):
    agents = pytest.importorskip("agents")
    import asyncio
    agents.set_tracing_disabled(True)
    from openai import AsyncOpenAI
    server = start()
    client = AsyncOpenAI(api_key="unused", base_url=server.url + "/openai")
    agent = agents.Agent(name="planner", instructions="Plan trips.",
                         model=agents.OpenAIResponsesModel(model="trip-planner", openai_client=client))

    async def conversation():
        conversation_id = (await client.conversations.create()).id
        return [(await agents.Runner.run(agent, text, conversation_id=conversation_id)).final_output
                for text in DOCUMENT_TURNS]
    outputs = asyncio.run(asyncio.wait_for(conversation(), 60))
    assert outputs[0].startswith("Got it: destination Paris.") and outputs[1].startswith("Got it: budget 2000.")
    assert outputs[2].startswith("## Your trip to Paris")


def test_a_history_of_item_references_as_the_vercel_ai_sdk_sends_it_reads_like_the_whole_history(start):
    server = start()

    def user(text):
        return {"role": "user", "content": [{"type": "input_text", "text": text}]}

    def respond(history):   # the body of @ai-sdk/openai with store: true (its default)
        reply = requests.post(server.url + "/openai/responses", timeout=10,
                              json={"model": "trip-planner", "input": history, "store": True})
        assert reply.status_code == 200, reply.text
        return reply.json()
    history = [user(DOCUMENT_TURNS[0])]
    first = respond(history)
    assert first["output_text"].startswith("Got it: destination Paris.") and "budget" in first["output_text"]
    history += [{"type": "item_reference", "id": item["id"]} for item in first["output"]] + [user("2000")]
    second = respond(history)
    assert second["output_text"].startswith("Got it: budget 2000.")
    assert "Read the earlier messages again" not in second["output"][0]["summary"][0]["text"]   # its state, not a replay
    history += [{"type": "item_reference", "id": item["id"]} for item in second["output"]] + [user(DOCUMENT_TURNS[2])]
    third = respond(history)
    assert third["output_text"].startswith("## Your trip to Paris") and "2000" in third["output"][0]["summary"][0]["text"]
    whole = [user(DOCUMENT_TURNS[0]), {"role": "assistant", "content": first["output_text"]}, user("2000")]
    assert respond(whole)["output_text"] == second["output_text"]   # the same history sent in full
    unknown = requests.post(server.url + "/openai/responses", timeout=10, json={
        "model": "trip-planner", "input": [user("hi"), {"type": "item_reference", "id": "msg_gone"}]})
    assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "input[1]"
    assert "msg_gone" in unknown.json()["error"]["message"]
    for reference, words in (({"type": "item_reference"}, "Missing required parameter: 'input[1].id'"),
                             ({"type": "item_reference", "id": None}, "Missing required parameter: 'input[1].id'"),
                             ({"type": "item_reference", "id": 7}, "'input[1].id' must be a string, not a number.")):
        with pytest.raises(openai.BadRequestError) as caught:
            server.client.responses.create(model="trip-planner", input=[user("hi"), reference])
        assert caught.value.body["param"] == "input[1].id" and words in caught.value.body["message"]
        assert "None" not in caught.value.body["message"]


def test_a_responses_input_items_are_listed_a_page_at_a_time_as_openais(start):
    server = start()
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "destination: Rome"},
               {"role": "assistant", "content": "Noted."}, {"role": "user", "content": "budget: 2000"}]
    response = server.client.responses.create(model="trip-planner", input=history)
    items = list(server.client.responses.input_items.list(response.id, order="asc", limit=3))   # two pages
    assert [(item.role, item.content[0].text) for item in items] == [(m["role"], m["content"]) for m in history]
    assert len({item.id for item in items}) == 4
    newest = server.client.responses.input_items.list(response.id, limit=1)
    assert newest.data[0].id == items[-1].id and newest.has_more and newest.first_id == newest.last_id
    after = requests.get(f"{server.url}/openai/responses/{response.id}/input_items", timeout=10,
                         params={"after": items[1].id, "order": "asc"}).json()
    assert [item["id"] for item in after["data"]] == [items[2].id, items[3].id] and not after["has_more"]
    for query in ({"limit": "0"}, {"order": "up"}, {"after": "msg_x"}):
        bad = requests.get(f"{server.url}/openai/responses/{response.id}/input_items", params=query, timeout=10)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == next(iter(query))
    assert requests.get(f"{server.url}/openai/responses/resp_x/input_items", timeout=10).status_code == 404


@pytest.mark.parametrize("name, value", [
    ("max_output_tokens", 100), ("temperature", 0.5), ("top_p", 0.9), ("prompt", {"id": "pmpt_1"}),
    ("tools", [{"type": "function", "name": "f", "parameters": {}}]), ("tool_choice", "required"),
    ("text", {"format": {"type": "json_object"}}), ("truncation", "sometimes"), ("frobnicate", 1)])
def test_a_field_a_workflow_cannot_honour_is_a_400_naming_it(start, name, value):
    reply = requests.post(start().url + "/openai/responses", timeout=10,
                          json={"model": "trip-planner", "input": "destination: Rome", name: value})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == name
    assert f"'{name}'" in reply.json()["error"]["message"]


def test_fields_that_change_nothing_for_a_workflow_are_taken_and_truncation_is_echoed(start):
    reply = requests.post(start().url + "/openai/responses", timeout=10, json={
        "model": "trip-planner", "input": "destination: Rome", "truncation": "auto", "tools": [], "tool_choice": "auto",
        "include": ["reasoning.encrypted_content"], "user": "u1", "parallel_tool_calls": True, "temperature": None,
        "max_output_tokens": None, "text": {"format": {"type": "text"}, "verbosity": "low"}, "service_tier": "auto",
        "reasoning": {"summary": "auto"}, "safety_identifier": "s1", "prompt_cache_key": "k"})
    assert reply.status_code == 200 and reply.json()["truncation"] == "auto"


def held_workflow(release):
    """The echo workflow behind a node that holds until ``release`` is set or its run is stopped
    (10 s at most, so that a test waiting for something else fails rather than hangs)."""
    def hold(inputs, context):
        deadline = time.monotonic() + 10
        while not release.is_set() and not context.stop.is_set() and time.monotonic() < deadline:
            time.sleep(0.01)
        return "held"
    nodes = [{"id": "hold", "type": "hold", "inputs": {"w": {"query": "word"}}},
             {"id": "say", "type": "template", "inputs": {"template": "You said {word}.", "word": {"query": "word"},
                                                         "after": {"link": "hold"}}},
             {"id": "answer", "type": "output", "inputs": {"text": {"link": "say"}}}]
    return {"workflows": [workflow(nodes=nodes)], "node_types": {"hold": cozyopenai.NodeType(hold)}}


def test_a_background_response_returns_at_once_and_is_polled_to_completion(start):
    release = threading.Event()
    held = held_workflow(release)
    client = start(held["workflows"], node_types=held["node_types"]).client
    started = client.responses.create(model="echo", input="word: kite", background=True)
    assert started.status in ("queued", "in_progress") and started.background and started.output_text == ""
    assert client.responses.retrieve(started.id).status == "in_progress"
    release.set()
    wait_until(lambda: client.responses.retrieve(started.id).status == "completed",
               "the background response did not complete within 10 s")
    done = client.responses.retrieve(started.id)
    assert done.output_text == "You said kite." and done.background and "hold finished" in done.output[0].summary[0].text
    after = client.responses.create(model="echo", input="word: sail", previous_response_id=started.id)
    assert after.output_text == "Changed the word from kite to sail.\n\nYou said sail."   # from its state
    with pytest.raises(openai.BadRequestError):   # a foreground response cannot be cancelled
        client.responses.cancel(after.id)
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model="echo", input="word: x", background=True, store=False)


def test_a_cancel_answers_the_stopped_response_as_retrieving_it_shows_with_what_it_had_written(start, fake_llm):
    fake_llm.endless_node_stream = True   # the node writes until it is stopped
    fake_llm.extractions = {"word: loop": {"word": "loop"}}
    client = start([_llm_node_workflow()], llm=fake_llm.settings()).client.with_options(timeout=20, max_retries=0)
    stream = client.responses.create(model="echo", input="word: loop", background=True, stream=True)
    deadline, response_id = time.monotonic() + 10, None
    for event in stream:   # until the answer has begun
        assert time.monotonic() < deadline, "no answer text within 10 s"
        response_id = response_id or event.response.id   # response.created comes first
        if event.type == "response.output_text.delta":
            break
    stream.close()
    cancelled = client.responses.cancel(response_id)
    assert cancelled.status == "cancelled" and cancelled.model_dump() == client.responses.retrieve(
        cancelled.id).model_dump()
    assert [item.type for item in cancelled.output] == ["reasoning", "message"]
    answer = cancelled.output[1].content[0].text
    assert answer.startswith("and on ") and cancelled.output[1].status == "incomplete"
    assert answer.endswith("and on \n\nSorry, the workflow stopped: step 'write' failed (the run was stopped). "
                           'Your inputs are kept; say "again" to retry, or change a value.')
    assert fake_llm.endless_stream_ended.wait(10)


def test_a_conversation_made_on_one_instance_is_continued_and_listed_on_another_sharing_redis(start, redis_server):
    first, second = (start(store=redis_server.url) for _ in range(2))
    conversation = first.client.conversations.create()
    for server, text in zip((first, second, first), DOCUMENT_TURNS):
        reply = server.client.responses.create(model="trip-planner", input=text, conversation=conversation.id)
    assert reply.output_text.startswith("## Your trip to Paris")
    assert len(second.client.conversations.items.list(conversation.id, limit=100).data) == 9


def test_a_background_response_cancelled_on_another_instance_stops_its_run(start, redis_server):
    release = threading.Event()
    held = held_workflow(release)
    running, other = (start(held["workflows"], node_types=held["node_types"], store=redis_server.url)
                      for _ in range(2))
    started = running.client.responses.create(model="echo", input="word: kite", background=True)
    cancelled = other.client.responses.cancel(started.id)   # seen by the run at its next heartbeat
    assert cancelled.status == "cancelled" and cancelled.id == started.id
    assert running.client.responses.retrieve(started.id).model_dump() == cancelled.model_dump()   # its end, waited for
    assert other.client.responses.cancel(started.id).status == "cancelled"   # again: the same answer
    release.set()   # for the next run (the cancelled one stopped while its node held)
    after = other.client.responses.create(model="echo", input="word: sail", previous_response_id=started.id)
    assert after.output_text.endswith("You said sail.")   # the conversation was freed


def test_a_background_stream_dropped_mid_run_is_resumed_after_its_last_event_on_another_instance(start,
                                                                                                 redis_server):
    release = threading.Event()
    held = held_workflow(release)
    first, second = (start(held["workflows"], node_types=held["node_types"], store=redis_server.url)
                     for _ in range(2))
    stream = first.client.responses.create(model="echo", input="word: kite", background=True, stream=True)
    seen = []
    for event in stream:
        seen.append(event)
        if event.type == "response.reasoning_summary_text.delta" and "hold started" in event.delta:
            break
    stream.close()   # the client leaves while "hold" runs; the run goes on without it
    response_id = seen[0].response.id
    assert seen[0].type == "response.created" and seen[0].response.background
    release.set()
    resumed = list(second.client.responses.retrieve(response_id, stream=True,
                                                    starting_after=seen[-1].sequence_number))
    numbers = [event.sequence_number for event in seen + resumed]
    assert numbers == list(range(len(numbers)))   # nothing lost, nothing twice
    assert resumed[-1].type == "response.completed" and resumed[-1].response.output_text == "You said kite."
    everything = list(second.client.responses.retrieve(response_id, stream=True))
    assert [event.type for event in everything] == [event.type for event in seen + resumed]


def test_a_background_response_whose_instance_is_killed_is_marked_failed_not_left_in_progress(
        start, redis_server, tmp_path, monkeypatch):
    write_slow_workflows(tmp_path / "slow.json")
    url = redis_server.url + "?lock_seconds=1"
    with command_line_server("--store", url, "--workflows", str(tmp_path / "slow.json")) as doomed:
        started = requests.post(doomed.url + "/openai/responses", timeout=10,
                                json={"model": "echo", "input": "word: kite", "background": True}).json()
        assert started["status"] == "in_progress"
        os.kill(doomed.process.pid, 9)
    monkeypatch.setattr(cozyopenai, "BACKGROUND_LEASE_SECONDS", 1.0)   # the survivor's patience, shortened
    survivor = start([workflow()], store=url)
    wait_until(lambda: survivor.client.responses.retrieve(started["id"]).status == "failed",
               "the dead instance's background response was not marked failed within 10 s")
    failed = survivor.client.responses.retrieve(started["id"])
    assert failed.error.code == "server_error" and "stopped before it finished" in failed.error.message
    events = list(survivor.client.responses.retrieve(started["id"], stream=True))
    assert events[-1].type == "response.failed"


def test_the_agents_sdk_talks_to_a_workflow_over_the_responses_api(start):
    agents = pytest.importorskip("agents")
    import asyncio
    agents.set_tracing_disabled(True)   # its traces would go to OpenAI's servers: nothing leaves this machine
    from openai import AsyncOpenAI
    server = start()
    model = agents.OpenAIResponsesModel(model="trip-planner",
                                        openai_client=AsyncOpenAI(api_key="unused", base_url=server.url + "/openai"))
    agent = agents.Agent(name="planner", instructions="Plan trips.", model=model)

    async def conversation():
        outputs, previous, reasoning = [], None, []
        for number, text in enumerate(DOCUMENT_TURNS):
            if number < 2:
                result = await agents.Runner.run(agent, text, previous_response_id=previous)
            else:
                result = agents.Runner.run_streamed(agent, text, previous_response_id=previous)
                async for event in result.stream_events():
                    if event.type == "raw_response_event" and event.data.type == \
                            "response.reasoning_summary_text.delta":
                        reasoning.append(event.data.delta)
            outputs.append(result.final_output)
            previous = result.last_response_id
        return outputs, "".join(reasoning)
    outputs, reasoning = asyncio.run(asyncio.wait_for(conversation(), 60))
    assert outputs[0].startswith("Got it: destination Paris.") and outputs[1].startswith("Got it: budget 2000.")
    assert outputs[2].startswith("## Your trip to Paris") and "Running trip-planner" in reasoning


####################################################################################
# MCP: the workflows as tools, missing inputs asked for by elicitation
####################################################################################

def mcp_session(server, elicit=None, **options):
    """An MCP client session of the official SDK on ``server``'s /mcp; ``elicit(message, schema)``
    answers the elicitations with an ElicitResult (no callback: the client cannot elicit)."""
    mcp = pytest.importorskip("mcp")
    import mcp_types

    async def on_elicit(context, params):
        return elicit(params.message, params.requested_schema, mcp_types)
    return mcp.Client(server.url + "/mcp", elicitation_callback=on_elicit if elicit else None,
                      read_timeout_seconds=30, **options)


def run_async(coroutine):
    import asyncio
    return asyncio.run(asyncio.wait_for(coroutine, 60))


MCP_MODES = ["2026-07-28", "auto", "legacy"]   # the client's era: per-request, discovered, handshake


@pytest.mark.parametrize("mode", MCP_MODES)
def test_mcp_lists_each_workflow_as_a_tool_without_its_fixed_inputs_or_required_inputs(start, mode):
    server = start([workflow(fixed_inputs={"api_token": "sk-hidden-1234567890abcdef"}, nodes=[
        {"id": "say", "type": "template", "inputs": {"template": "{word}", "word": {"query": "word"},
                                                     "token": {"fixed": "api_token"}}},
        {"id": "answer", "type": "output", "inputs": {"text": {"link": "say"}}}])] + json.load(open(WORKFLOWS_PATH))[
        "workflows"])

    async def tools():
        async with mcp_session(server, mode=mode) as client:
            return client.protocol_version, (await client.list_tools()).tools
    version, listed = run_async(tools())
    assert version in (cozyopenai.MCP_VERSIONS if mode == "legacy" else cozyopenai.MCP_MODERN_VERSIONS)
    assert [tool.name for tool in listed] == ["echo", "trip-planner", "month-calendar", "weather-now"]
    echo, trip = listed[0], listed[1]
    assert "api_token" not in json.dumps(echo.input_schema) and "sk-hidden" not in json.dumps(echo.input_schema)
    schema = trip.input_schema
    assert "required" not in schema   # a client may call with what it knows: the rest is asked for
    assert schema["properties"]["budget"]["description"].endswith("Asked for when left out.")
    assert schema["properties"]["pace"] == {"type": "string", "enum": ["relaxed", "balanced", "packed"], "title": "Pace",
                                            "description": "How full the days should be.", "default": "balanced"}
    assert schema["properties"]["budget"]["type"] == "number" and "request" in schema["properties"]
    assert listed[2].input_schema["properties"]["month"]["maximum"] == 12


@pytest.mark.parametrize("mode", MCP_MODES)
def test_mcp_calls_a_workflow_with_its_arguments_and_reports_progress(start, mode):
    server, progress = start(), []

    async def call():
        async def on_progress(done, total, message):
            progress.append((done, total, message))
        async with mcp_session(server, mode=mode) as client:
            return await client.call_tool("month-calendar", {"year": 2026, "month": 3}, progress_callback=on_progress)
    result = run_async(call())
    assert not result.is_error and "March 2026" in result.content[0].text
    assert [done for done, _, _ in progress] == [0.5, 1, 1.5, 2, 2.5, 3] and progress[-1][1] == 3
    assert progress[0][2].startswith("calendar started")


@pytest.mark.parametrize("mode", MCP_MODES)
def test_mcp_asks_for_missing_inputs_by_elicitation_and_honours_decline_and_cancel(start, mode):
    server, asked = start(), []

    def answer(message, schema, types):
        asked.append((message, sorted(schema["properties"])))
        return types.ElicitResult(action="accept", content={"budget": 1500, "travel_dates": "10 to 17 October"})

    async def call(elicit, arguments):
        async with mcp_session(server, elicit, mode=mode) as client:
            return await client.call_tool("trip-planner", arguments)
    result = run_async(call(answer, {"destination": "Lisbon"}))
    assert not result.is_error and result.content[0].text.startswith("## Your trip to Lisbon")
    assert "1500 in total" in result.content[0].text
    assert asked == [("I still need the budget and travel dates. What is your total budget for the trip? "
                      "When would you like to travel, and for how long?", ["budget", "travel_dates"])]
    for action in ("decline", "cancel"):
        ended = run_async(call(lambda message, schema, types: types.ElicitResult(action=action),
                               {"destination": "Lisbon"}))
        assert ended.is_error and f"the user chose to {action} instead of giving the budget" in ended.content[0].text


def test_an_mcp_form_message_from_the_llm_is_used_only_when_it_names_every_field(start, fake_llm):
    server, asked = start(llm=fake_llm.settings()), []

    def answer(message, schema, types):
        asked.append(message)
        return types.ElicitResult(action="decline")

    async def call():
        async with mcp_session(server, answer) as client:
            return await client.call_tool("trip-planner", {"destination": "Lisbon"})
    fake_llm.question = "Lisbon! What is your budget?"                 # asks the budget only
    run_async(call())
    fake_llm.question = "Lisbon! What budget and travel dates do you have in mind?"
    run_async(call())
    assert asked == ["I still need the budget and travel dates. What is your total budget for the trip? "
                     "When would you like to travel, and for how long?", fake_llm.question]


def test_mcp_re_asks_a_bad_value_and_reads_a_free_text_request(start):
    server, answers = start(), iter([{"month": 13}, {"month": 3}])

    async def call(tool, arguments, elicit=None):
        async with mcp_session(server, elicit) as client:
            return await client.call_tool(tool, arguments)
    result = run_async(call("month-calendar", {"year": 2026},
                            lambda message, schema, types: types.ElicitResult(action="accept", content=next(answers))))
    assert "March 2026" in result.content[0].text
    request = run_async(call("trip-planner", {"request": "a week in Lisbon in October, about 1200 euros"}))
    assert not request.is_error and "Lisbon" in request.content[0].text and "1200 in total" in request.content[0].text


@pytest.mark.parametrize("mode", ["2026-07-28", "legacy"])
def test_mcp_arguments_and_form_answers_pass_the_typed_checks_of_a_chat_answer(start, mode):
    server, asked = start(), []
    answers = iter([{"budget": 900, "travel_dates": "42"}, {"travel_dates": True}, {"travel_dates": "10 to 17 October"}])

    def answer(message, schema, types):
        asked.append((message, sorted(schema["properties"])))
        return types.ElicitResult(action="accept", content=next(answers))

    async def calls():
        async with mcp_session(server, answer, mode=mode) as client:
            gathered = await client.call_tool("trip-planner", {"destination": "Lisbon"})
        async with mcp_session(server, mode=mode) as client:
            refused = await client.call_tool("trip-planner", {"destination": 5, "budget": True, "travel_dates": "42"})
            huge = await client.call_tool("trip-planner", {"destination": "Lisbon", "budget": 1e308,
                                                           "travel_dates": "May"})
            untold = await client.call_tool("trip-planner", {"request": 5})   # not skipped as if absent
            listed = await client.call_tool("trip-planner", {"destination": "Lisbon", "budget": [1],
                                                             "travel_dates": "May"})
        return gathered, refused, huge, untold, listed
    gathered, refused, huge, untold, listed = run_async(calls())
    assert [fields for _, fields in asked] == [["budget", "travel_dates"], ["travel_dates"], ["travel_dates"]]
    assert asked[1][0].startswith("I need a period or a date for the travel dates, not '42'. When would you like")
    assert asked[2][0].startswith("I need a period or a date for the travel dates, not yes.")
    assert not gathered.is_error and "- **When:** 10 to 17 October" in gathered.content[0].text
    assert "900 in total" in gathered.content[0].text
    assert refused.is_error and "When: 42" not in refused.content[0].text
    assert "- destination: I need a place for the destination, not 5\n" in refused.content[0].text
    assert "- budget: I need a number for the budget, not yes\n" in refused.content[0].text   # never Python's True
    assert "- travel_dates: I need a period or a date for the travel dates, not '42'\n" in refused.content[0].text
    assert huge.is_error and "- budget: the budget is too large\n" in huge.content[0].text
    assert untold.is_error and "the argument 'request' must be text" in untold.content[0].text
    assert listed.is_error and "- budget: I need one value for the budget, not [1]\n" in listed.content[0].text


def test_an_mcp_request_is_read_by_an_extraction_call_that_writes_no_question(start, fake_llm):
    fake_llm.extractions = {"a week in Lisbon": {"destination": "Lisbon"}}
    server = start(llm=fake_llm.settings())

    async def call():
        async with mcp_session(server, lambda message, schema, types: types.ElicitResult(action="decline")) as client:
            return await client.call_tool("trip-planner", {"request": "a week in Lisbon"})
    run_async(call())
    (extraction,) = fake_llm.calls_of("extraction")   # MCP asks by a form: no question written in the call
    assert "question" not in extraction["response_format"]["json_schema"]["schema"]["required"]


@pytest.mark.parametrize("mode", ["auto", "legacy"])
def test_mcp_without_elicitation_lists_what_is_missing_and_why_and_refuses_unknown_arguments(start, mode):
    server = start()

    async def call(arguments):
        async with mcp_session(server, mode=mode) as client:   # no callback: the client cannot elicit
            return await client.call_tool("trip-planner", arguments)
    result = run_async(call({"destination": "Lisbon", "budget": "lots"}))
    assert result.is_error
    assert "- budget: I need a single number for the budget, not 'lots'" in result.content[0].text
    assert "- travel_dates: When the user wants to travel" in result.content[0].text
    typo = run_async(call({"destination": "Lisbon", "budjet": 1500}))
    assert typo.is_error and "Not run: there is no argument 'budjet'" in typo.content[0].text


def test_mcp_errors_are_json_rpc_errors_and_keys_and_origins_are_checked(start):
    server = start(api_keys=["k"])
    post = lambda body, **headers: requests.post(server.url + "/mcp", data=body, timeout=10, headers={  # noqa: E731
        "Content-Type": "application/json", "Accept": "application/json, text/event-stream", **headers})
    assert post(b'{"jsonrpc": "2.0", "id": 1, "method": "ping"}').status_code == 401
    key = {"Authorization": "Bearer k"}
    bad = post(b"{nope", **key)
    assert bad.status_code == 400 and bad.json()["error"]["code"] == -32700
    assert post(b'{"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}}', Origin="https://evil.example",
                **key).status_code == 403
    initialized = post(b'{"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {"protocolVersion": '
                       b'"2025-06-18", "capabilities": {}}}', **key)
    assert initialized.json()["result"]["protocolVersion"] == "2025-06-18" and initialized.json()["id"] == 0
    session = {"Mcp-Session-Id": initialized.headers["Mcp-Session-Id"], **key}
    unknown = post(b'{"jsonrpc": "2.0", "id": 2, "method": "resources/list"}', **session)
    assert unknown.json()["error"]["code"] == -32601
    wrong_tool = post(b'{"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": "nope"}}', **session)
    assert wrong_tool.json()["error"]["code"] == -32602
    assert post(b'{"jsonrpc": "2.0", "id": 4, "method": "ping"}', **{"MCP-Protocol-Version": "1999-01-01"},
                **session).status_code == 400   # a version it does not speak, as the specification asks
    assert post(b'{"jsonrpc": "2.0", "id": 4, "method": "ping"}', **{"MCP-Protocol-Version": "2025-06-18"},
                **session).json()["result"] == {}
    batch = post(b'[{"jsonrpc": "2.0", "id": 6, "method": "ping"}]', **session)
    assert batch.status_code == 400 and "2025-03-26 only" in batch.json()["error"]["message"]
    assert requests.delete(server.url + "/mcp", headers=session, timeout=10).status_code == 200
    assert post(b'{"jsonrpc": "2.0", "id": 5, "method": "ping"}', **session).status_code == 404


def test_mcp_batches_are_answered_under_2025_03_26_which_allows_them(start):
    server = start()
    post = lambda body, **headers: requests.post(server.url + "/mcp", json=body, timeout=10, headers={  # noqa: E731
        "Accept": "application/json, text/event-stream", **headers})
    initialized = post({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
        "protocolVersion": "2025-03-26", "capabilities": {}}})
    session = {"Mcp-Session-Id": initialized.headers["Mcp-Session-Id"]}
    answers = post([{"jsonrpc": "2.0", "method": "notifications/initialized"},
                    {"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
                    {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {
                        "name": "month-calendar", "arguments": {"year": 2026, "month": 3}}},
                    {"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": "month-calendar",
                                                                                   "arguments": {"month": "x"}}},
                    {"jsonrpc": "2.0", "id": 4, "method": "nope"}], **session)
    listed, called, refused, unknown = answers.json()
    assert answers.status_code == 200 and [answer["id"] for answer in answers.json()] == [1, 2, 3, 4]
    assert "trip-planner" in [tool["name"] for tool in listed["result"]["tools"]]
    assert "March 2026" in called["result"]["content"][0]["text"]
    assert refused["result"]["isError"] and "- month:" in refused["result"]["content"][0]["text"]
    assert unknown["error"]["code"] == -32601
    assert post([{"jsonrpc": "2.0", "method": "notifications/initialized"}], **session).status_code == 202


def test_mcp_refuses_ids_params_batches_and_bodies_json_rpc_does_not_allow_with_its_own_errors(start):
    server = start()

    def post(body, **headers):
        return requests.post(server.url + "/mcp", data=body if isinstance(body, bytes) else json.dumps(body),
                             timeout=10, headers={"Content-Type": "application/json",
                                                  "Accept": "application/json, text/event-stream", **headers})
    for odd in ({"a": 1}, [1], True):   # JSON-RPC ids are strings, numbers or null
        refused = post({"jsonrpc": "2.0", "id": odd, "method": "initialize", "params": {}})
        assert refused.status_code == 400 and refused.json()["id"] is None, odd
        assert refused.json()["error"]["code"] == -32600 and "'id' must be a string, a number or null" in \
            refused.json()["error"]["message"]
    for params, named in (({"capabilities": 5}, "params.capabilities"), ({"protocolVersion": 5},
                                                                           "params.protocolVersion"), (5, "params")):
        refused = post({"jsonrpc": "2.0", "id": 3, "method": "initialize", "params": params})
        assert refused.status_code == 400 and "Mcp-Session-Id" not in refused.headers
        assert refused.json()["id"] == 3 and refused.json()["error"]["code"] == -32602
        assert f"initialize's {named!r} must be" in refused.json()["error"]["message"]
    empty = post([])   # JSON-RPC's invalid request, before any talk of sessions
    assert empty.status_code == 400 and empty.json()["id"] is None and empty.json()["error"]["code"] == -32600
    assert "batch is empty" in empty.json()["error"]["message"]
    deep = post(b"[" * 5000 + b"]" * 5000)   # said as /openai says it
    assert deep.status_code == 400 and deep.json()["error"] == {"code": -32700,
                                                                "message": "The request body is nested too deeply."}
    session = {"Mcp-Session-Id": post({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
        "protocolVersion": "2025-03-26", "capabilities": {}}}).headers["Mcp-Session-Id"]}
    odd, fine = post([{"jsonrpc": "2.0", "id": {"a": 1}, "method": "ping"}, {"jsonrpc": "2.0", "id": 2,
                                                                            "method": "ping"}], **session).json()
    assert odd["id"] is None and odd["error"]["code"] == -32600 and fine == {"jsonrpc": "2.0", "id": 2, "result": {}}
    meta = {"io.modelcontextprotocol/protocolVersion": "2026-07-28", "io.modelcontextprotocol/clientCapabilities": {}}
    unheaded = post({"jsonrpc": "2.0", "id": 7, "method": "server/discover", "params": {"_meta": meta}},
                    **{"Mcp-Method": "server/discover"})
    assert unheaded.status_code == 400 and unheaded.json()["error"]["code"] == -32020
    assert "MCP-Protocol-Version header is missing" in unheaded.json()["error"]["message"]
    numbered = post({"jsonrpc": "2.0", "id": 8, "method": "tools/list", "params": {"_meta": {
        **meta, "io.modelcontextprotocol/clientCapabilities": 5}}}, **{"Mcp-Method": "tools/list",
                                                                       "MCP-Protocol-Version": "2026-07-28"})
    assert numbered.status_code == 400 and numbered.json()["error"]["code"] == -32602


def test_mcp_2026_requests_are_checked_against_their_envelope_and_headers(start):
    server = start()
    meta = {"io.modelcontextprotocol/protocolVersion": "2026-07-28",
            "io.modelcontextprotocol/clientCapabilities": {}}

    def post(method, params=None, version="2026-07-28", **headers):
        return requests.post(server.url + "/mcp", timeout=10, json={
            "jsonrpc": "2.0", "id": 7, "method": method, "params": {"_meta": meta} if params is None else params},
            headers={"Accept": "application/json, text/event-stream", "MCP-Protocol-Version": version,
                     "Mcp-Method": method, **headers})
    discovered = post("server/discover").json()["result"]
    assert discovered["supportedVersions"][0] == "2026-07-28" and "2025-11-25" in discovered["supportedVersions"]
    assert discovered["resultType"] == "complete" and discovered["capabilities"]["tools"] == {"listChanged": False}
    assert discovered["_meta"]["io.modelcontextprotocol/serverInfo"]["name"] == "cozyopenai"
    listed = post("tools/list").json()["result"]
    assert listed["resultType"] == "complete" and listed["ttlMs"] > 0 and listed["cacheScope"] == "public"
    later = {"_meta": {**meta, "io.modelcontextprotocol/protocolVersion": "2027-01-01"}}
    unsupported = post("tools/list", later, version="2027-01-01")
    assert unsupported.status_code == 400 and unsupported.json()["error"]["code"] == -32022
    assert unsupported.json()["error"]["data"] == {"supported": ["2026-07-28", "2025-11-25", "2025-06-18",
                                                                 "2025-03-26"], "requested": "2027-01-01"}
    mismatched = post("tools/list", **{"Mcp-Method": "tools/call"})
    assert mismatched.status_code == 400 and mismatched.json()["error"]["code"] == -32020
    wrong_name = post("tools/call", {"_meta": meta, "name": "trip-planner"}, **{"Mcp-Name": "month-calendar"})
    assert wrong_name.json()["error"]["code"] == -32020
    bare = post("tools/list", {})
    assert bare.status_code == 400 and bare.json()["error"]["code"] == -32602
    assert post("ping").status_code == 404 and post("ping").json()["error"]["code"] == -32601
    notified = requests.post(server.url + "/mcp", timeout=10, json={"jsonrpc": "2.0", "method": "notifications/x"},
                             headers={"MCP-Protocol-Version": "2026-07-28"})
    assert notified.status_code == 202
    called = post("tools/call", {"_meta": meta, "name": "trip-planner", "arguments": {"destination": "Lisbon"}},
                  **{"Mcp-Name": "trip-planner", "Accept": "application/json"}).json()["result"]
    assert called["resultType"] == "complete" and called["isError"]   # no elicitation capability: what is missing
    assert "- budget:" in called["content"][0]["text"]
    eliciting = {**meta, "io.modelcontextprotocol/clientCapabilities": {"elicitation": {"form": {}}}}
    asked = post("tools/call", {"_meta": eliciting, "name": "trip-planner", "arguments": {"destination": "Lisbon"}},
                 **{"Mcp-Name": "trip-planner", "Accept": "application/json"}).json()["result"]
    assert asked["resultType"] == "input_required" and asked["requestState"].startswith("cz1.")
    (form,) = asked["inputRequests"].values()
    assert form["method"] == "elicitation/create" and form["params"]["message"].startswith(
        "I still need the budget and travel dates.")
    assert form["params"]["requestedSchema"]["required"] == ["budget", "travel_dates"]
    (key,) = asked["inputRequests"]
    declined = post("tools/call", {"_meta": eliciting, "name": "trip-planner", "requestState": asked["requestState"],
                                   "inputResponses": {key: {"action": "decline"}}},
                    **{"Mcp-Name": "trip-planner", "Accept": "application/json"}).json()["result"]
    assert declined["isError"] and "the user chose to decline" in declined["content"][0]["text"]
    replayed = post("tools/call", {"_meta": eliciting, "name": "month-calendar", "requestState": asked["requestState"],
                                   "inputResponses": {}},
                    **{"Mcp-Name": "month-calendar", "Accept": "application/json"})
    assert replayed.status_code == 400 and "belongs to another tool" in replayed.json()["error"]["message"]


def test_mcp_odd_answers_and_arguments_end_with_a_result_and_a_rebinding_host_is_refused(start):
    server = start()

    async def call(arguments, elicit=None):
        async with mcp_session(server, elicit) as client:
            return await client.call_tool("trip-planner", arguments)
    weird = run_async(call({"destination": "Lisbon"},
                           lambda message, schema, types: types.ElicitResult(action="accept", content={})))
    assert weird.is_error and weird.content[0].text.startswith("Asked 3 times without usable values")
    typed = run_async(call({"destination": "Lisbon", "budget": {"a": 1}, "travel_dates": "May"}))
    assert typed.is_error and 'I need one value for the budget, not {"a": 1}' in typed.content[0].text
    initialized = requests.post(server.url + "/mcp", timeout=10, json={
        "jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}})
    answer = requests.post(server.url + "/mcp", timeout=10, headers={
        "Mcp-Session-Id": initialized.headers["Mcp-Session-Id"]}, json={"jsonrpc": "2.0", "id": "x", "result": 5})
    assert answer.status_code == 202   # an answer to no elicitation of ours: nothing waits for it
    rebound = requests.post(server.url + "/mcp", timeout=10, headers={"Origin": "http://attacker.example:1",
                                                                      "Host": "attacker.example:1"},
                            json={"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}})
    assert rebound.status_code == 403   # DNS rebinding: the Host matches the page's, still refused


def test_the_agents_sdk_calls_the_trip_planner_with_only_a_destination_and_hears_what_is_missing(start):
    agents = pytest.importorskip("agents")
    from agents.mcp import MCPServerStreamableHttp
    server = start()

    async def call():
        async with MCPServerStreamableHttp({"url": server.url + "/mcp", "timeout": 30}, name="cozy",
                                           client_session_timeout_seconds=30) as tools:
            return await tools.call_tool("trip-planner", {"destination": "Lisbon"})
    result = run_async(call())   # not refused in the client: the schema requires nothing
    assert result.is_error   # this client cannot elicit: the result names what is missing
    assert "- budget:" in result.content[0].text and "- travel_dates:" in result.content[0].text


def test_the_readmes_python_mcp_code_reads_is_error_as_the_mcp_sdk_names_it():
    mcp_types = pytest.importorskip("mcp_types")
    assert mcp_types.CallToolResult.model_fields["is_error"].alias == "isError"   # isError on the wire only
    blocks = [block for block in readme_blocks("python") if "call_tool(" in block]
    assert blocks and any("result.is_error" in block for block in blocks)
    assert not any("isError" in line for block in blocks for line in block.splitlines()
                   if "#" not in line)   # code, not a comment naming the wire's field


def test_a_request_state_opens_only_for_its_tool_with_its_key_unaltered_and_in_time():
    key = cozyopenai.mcp_state_key("shared secret")
    assert key == cozyopenai.mcp_state_key("shared secret") and key != cozyopenai.mcp_state_key("another")
    sealed = cozyopenai.seal_request_state(key, {"tool": "trip-planner", "expires": time.time() + 60,
                                                 "values": {"destination": "Lisbon"}})
    assert "Lisbon" not in sealed and "trip-planner" not in sealed   # the values are not readable
    assert cozyopenai.open_request_state(key, sealed, "trip-planner")["values"] == {"destination": "Lisbon"}
    refusals = {
        "altered": (key, sealed[:-6] + ("A" if sealed[-6] != "A" else "B") + sealed[-5:], "trip-planner", None),
        "another key": (cozyopenai.mcp_state_key("another"), sealed, "trip-planner", None),
        "another tool": (key, sealed, "month-calendar", None),
        "expired": (key, sealed, "trip-planner", time.time() + 61),
        "forged": (key, "cz1." + "A" * 80, "trip-planner", None),
        "not ours": (key, "hello", "trip-planner", None)}
    for why, (opening_key, token, tool, now) in refusals.items():
        with pytest.raises(cozyopenai.McpError) as refused:
            cozyopenai.open_request_state(opening_key, token, tool, now)
        assert refused.value.code == -32602 and refused.value.status == 400, why
    assert "another tool" in str(pytest.raises(cozyopenai.McpError, cozyopenai.open_request_state, key, sealed,
                                               "month-calendar").value.message)


class RoundRobin:
    """A load balancer in front of several instances that sends every request to the next one,
    streaming the answer back; it notes which instance got each MCP method."""

    def __init__(self, backends):
        self.backends, self.served, self._next = backends, [], itertools.count()
        balancer = self

        class Forward(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                number = next(balancer._next) % len(balancer.backends)
                balancer.served.append((number, self.headers.get("Mcp-Method")))
                headers = {name: value for name, value in self.headers.items()
                           if name.lower() not in ("host", "content-length", "connection")}
                with requests.post(balancer.backends[number] + self.path, data=body, headers=headers, stream=True,
                                   timeout=30) as answer:
                    self.send_response(answer.status_code)
                    for name, value in answer.headers.items():
                        if name.lower() not in ("content-length", "transfer-encoding", "connection"):
                            self.send_header(name, value)
                    self.send_header("Connection", "close")
                    self.end_headers()
                    for chunk in answer.iter_content(None):
                        self.wfile.write(chunk)
                        self.wfile.flush()

            def log_message(self, *arguments):
                pass
        self.httpd = _ListeningLong(("127.0.0.1", 0), Forward)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_a_three_round_mcp_gathering_completes_with_every_request_sent_to_the_other_instance(start, redis_server):
    mcp = pytest.importorskip("mcp")
    import mcp_types
    instances = [start(store=redis_server.url, mcp_state_secret="the same on both") for _ in range(2)]
    balancer = RoundRobin([instance.url for instance in instances])
    answers = iter([{"budget": "lots"}, {"budget": 1500}, {"travel_dates": "10 to 17 October"}])
    asked = []

    async def answer(context, params):
        asked.append(sorted(params.requested_schema["properties"]))
        return mcp_types.ElicitResult(action="accept", content=next(answers))

    async def gather():
        async with mcp.Client(balancer.url + "/mcp", mode="2026-07-28", elicitation_callback=answer,
                              read_timeout_seconds=30) as client:
            result = await client.call_tool("trip-planner", {"destination": "Lisbon"})
            first = await client.session.call_tool("trip-planner", {"destination": "Lisbon"},
                                                   allow_input_required=True)
            state = first.request_state
            tampered = state[:-6] + ("A" if state[-6] != "A" else "B") + state[-5:]
            with pytest.raises(mcp.MCPError) as refused:
                await client.session.call_tool("trip-planner", {"destination": "Lisbon"}, request_state=tampered,
                                               input_responses={}, allow_input_required=True)
            return result, refused.value
    try:
        result, refused = run_async(gather())
    finally:
        balancer.close()
    assert not result.is_error and result.content[0].text.startswith("## Your trip to Lisbon")
    assert "1500 in total" in result.content[0].text
    assert asked == [["budget", "travel_dates"], ["budget", "travel_dates"], ["travel_dates"]]
    gathering = [number for number, method in balancer.served if method == "tools/call"][:4]   # 3 forms, 1 run
    assert gathering in ([0, 1, 0, 1], [1, 0, 1, 0])   # each round on the other instance than the one before
    assert refused.code == -32602 and "altered" in str(refused)


def _metrics_text(server):
    return requests.get(server.url + "/metrics", timeout=5).text


@pytest.mark.parametrize("mode", ["2026-07-28", "legacy"])
def test_a_cancelled_mcp_call_runs_no_node_after_the_cancel(start, mode):
    import asyncio
    inside, later_ran = threading.Event(), threading.Event()

    def hold(inputs, context):
        inside.set()
        context.stop.wait(10)   # a cancel or a hang-up ends the wait, as for a chat whose client left
        return "held"

    server = start_hold_then_later(start, hold, later_ran)

    async def call():
        async with mcp_session(server, mode=mode) as client:
            task = asyncio.ensure_future(client.call_tool("echo", {"word": "x"}))
            assert await asyncio.get_running_loop().run_in_executor(None, inside.wait, 10), "hold did not start"
            task.cancel()   # legacy: notifications/cancelled; 2026-07-28: the request's stream closed
            with contextlib.suppress(asyncio.CancelledError):
                await task
    run_async(call())
    wait_until(lambda: 'cozyopenai_runs_total{model="echo"' in _metrics_text(server),
               "the cancelled run did not end within 10 s")   # hold waits 10 s unless the cancel reaches it
    assert not later_ran.is_set()


def test_a_cancel_ends_a_pending_elicitation_and_the_workflow_never_runs(start):
    import asyncio
    server, asked = start(), threading.Event()

    async def call():
        async def never_answered(context, params):
            asked.set()
            await asyncio.sleep(30)
        async with mcp.Client(server.url + "/mcp", mode="legacy", elicitation_callback=never_answered,
                              read_timeout_seconds=30) as client:
            task = asyncio.ensure_future(client.call_tool("trip-planner", {"destination": "Lisbon"}))
            assert await asyncio.get_running_loop().run_in_executor(None, asked.wait, 10), "nothing was asked"
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await asyncio.get_running_loop().run_in_executor(None, lambda: wait_until(
                lambda: "cozyopenai_open_streams 0" in _metrics_text(server),
                "the call's stream was still open 10 s after the cancel"))   # its 600 s wait ended
    mcp = pytest.importorskip("mcp")
    run_async(call())
    assert 'cozyopenai_runs_total{model="trip-planner"' not in _metrics_text(server)


def inspector_command():
    """The MCP Inspector's command line, from the folder COZYOPENAI_INSPECTOR_DIR names (where
    .ci/run installs it from the npm registry), or None."""
    folder = os.environ.get("COZYOPENAI_INSPECTOR_DIR", "")
    launcher = os.path.join(folder, "node_modules", "@modelcontextprotocol", "inspector", "clients", "launcher",
                            "build", "index.js")
    return ["node", launcher, "--cli"] if folder and os.path.exists(launcher) and shutil.which("node") else None


@pytest.mark.skipif(inspector_command() is None, reason="the MCP Inspector is not installed (.ci/run installs it)")
def test_the_mcp_inspector_cli_lists_and_calls_a_tool(start, tmp_path):
    server = start()
    environment = {**os.environ, "HOME": str(tmp_path)}
    listed = subprocess.run(inspector_command() + [server.url + "/mcp", "--transport", "http", "--method",
                                                   "tools/list"], capture_output=True, text=True, timeout=60,
                            env=environment)
    assert listed.returncode == 0 and "trip-planner" in listed.stdout, listed.stderr
    called = subprocess.run(inspector_command() + [server.url + "/mcp", "--transport", "http", "--method",
                                                   "tools/call", "--tool-name", "month-calendar", "--tool-arg",
                                                   "year=2026", "--tool-arg", "month=3"],
                            capture_output=True, text=True, timeout=60, env=environment)
    assert called.returncode == 0 and "March 2026" in called.stdout, called.stderr


####################################################################################
# Metrics
####################################################################################

def test_metrics_count_turns_runs_failures_and_llm_calls_in_the_prometheus_format(start, fake_llm):
    server = start(llm=fake_llm.settings(single_call=False))
    Chat(server, "month-calendar").say("year: 2026\nmonth: 2")
    Chat(server, "month-calendar").say("year: 2026")
    response = requests.get(server.url + "/metrics", timeout=5)
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    text = response.text
    assert '# TYPE cozyopenai_turns_total counter' in text
    assert 'cozyopenai_turns_total{model="month-calendar"} 2' in text
    assert 'cozyopenai_runs_total{model="month-calendar",outcome="ok"} 1' in text
    assert 'cozyopenai_llm_calls_total{outcome="ok"} 3' in text   # two extractions and one question
    assert "cozyopenai_stored_conversations 2" in text and "cozyopenai_turn_seconds_count" in text
    keyed = start(api_keys=["k"])
    assert requests.get(keyed.url + "/metrics", timeout=5).status_code == 401
    assert requests.get(keyed.url + "/metrics", headers={"Authorization": "Bearer k"}, timeout=5).status_code == 200


def test_metrics_count_node_failures_by_type(start):
    nodes = [{"id": "fail", "type": "python", "inputs": {"function": "math:sqrt", "0": {"query": "word"}}},
             {"id": "answer", "type": "output", "inputs": {"text": {"link": "fail"}}}]
    server = start([workflow(nodes=nodes)])
    Chat(server, "echo").say("word: nope")
    assert 'cozyopenai_node_failures_total{type="python"} 1' in requests.get(server.url + "/metrics", timeout=5).text


####################################################################################
# Configuration: the options, as flags or COZYOPENAI_* variables
####################################################################################

def test_api_keys_come_from_the_environment_too():
    config = cozyopenai.config_from_environment({"COZYOPENAI_API_KEY": "a, b", "COZYOPENAI_STORE": "memory",
                                                 "COZYOPENAI_MCP_STATE_SECRET": "shared"})
    assert config["api_keys"] == ["a", "b"] and config["store"] == "memory" and config["mcp_state_secret"] == "shared"


def test_single_call_mode_comes_from_the_flag_or_the_environment():
    config = cozyopenai.config_from_environment({"COZYOPENAI_LLM_BASE_URL": "http://127.0.0.1:9/v1",
                                                 "COZYOPENAI_LLM_SINGLE_CALL": "true"})
    assert config["llm"].single_call is True
    arguments = cozyopenai.parse_arguments(["--llm-base-url", "http://x/v1", "--llm-single-call"], {})
    assert cozyopenai._config_from_arguments(arguments)["llm"].single_call is True
    arguments = cozyopenai.parse_arguments(["--llm-base-url", "http://x/v1", "--llm-question-call"], {})
    assert cozyopenai._config_from_arguments(arguments)["llm"].single_call is False
    assert cozyopenai.config_from_environment({"COZYOPENAI_LLM_BASE_URL": "http://x/v1",
                                               "COZYOPENAI_LLM_SINGLE_CALL": "false"})["llm"].single_call is False
    # Unset: one call while the upstream takes structured output (LLMClient.asks_in_extraction).
    assert cozyopenai.config_from_environment({"COZYOPENAI_LLM_BASE_URL": "http://x/v1"})["llm"].single_call is None


def command_line_options(monkeypatch):
    """The actions of the argument parser that ``cozyopenai.parse_arguments`` builds, taken
    from the parser itself as it parses, so a new flag is checked without being listed here."""
    parsers = []
    parse = cozyopenai._OneLineParser.parse_args

    def keep(parser, *arguments, **options):
        parsers.append(parser)
        return parse(parser, *arguments, **options)
    monkeypatch.setattr(cozyopenai._OneLineParser, "parse_args", keep)
    cozyopenai.parse_arguments([], {})
    (parser,) = parsers
    return [action for action in parser._actions if action.option_strings]


def test_help_and_the_readmes_configuration_table_list_every_option_the_parser_defines(monkeypatch):
    options = command_line_options(monkeypatch)
    result = subprocess.run([sys.executable, os.path.join(HERE, "cozyopenai.py"), "--help"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    for flag in (flag for option in options for flag in option.option_strings):
        assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", result.stdout), f"--help does not show {flag}"
    # Every setting (all but --help and --version) has its row: the flag, then its COZYOPENAI_* variable.
    settings = [option for option in options
                if not isinstance(option, (argparse._HelpAction, argparse._VersionAction))]
    with open(os.path.join(HERE, "README.md")) as handle:
        configuration = handle.read().split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    rows = {match.group(1): match.group(0) for match in re.finditer(r"^\| `(--[\w-]+)`.*$", configuration, re.M)}
    assert len(settings) >= 18 and rows, "the parser's settings or README.md's configuration table not found"
    for option in settings:
        (flag,) = [flag for flag in option.option_strings if flag.startswith("--")]
        assert flag in rows, f"README.md's configuration table has no row for {flag}"
        assert f"`COZYOPENAI_{option.dest.upper()}`" in rows[flag], rows[flag]
    assert set(rows) == {flag for option in settings for flag in option.option_strings}, "a row for no option"


@pytest.mark.parametrize("arguments, message", [
    (["--store", "README.md"], "store 'README.md': cannot keep conversations there"),
    (["--store", "/proc/nope"], "store '/proc/nope': cannot keep conversations there"),
    (["--expire-days", "-1"], "--expire-days must be positive, not -1"),
    (["--llm-timeout", "0"], "--llm-timeout must be positive, not 0"),
    (["--workers", "0"], "--workers must be at least 1, not 0"),
    (["--llm-model", "gpt"], "--llm-model needs --llm-base-url"),
])
def test_bad_options_stop_the_start_with_one_line_and_status_2(arguments, message):
    result = subprocess.run([sys.executable, os.path.join(HERE, "cozyopenai.py"), *arguments, "--port", "0"],
                            capture_output=True, text=True, timeout=30, cwd=HERE)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_an_unknown_log_level_is_refused_clearly():
    result = subprocess.run([sys.executable, os.path.join(HERE, "cozyopenai.py"), "--store", "memory"],
                            capture_output=True, text=True, timeout=30, cwd=HERE,
                            env={**os.environ, "COZYOPENAI_LOG_LEVEL": "verbose"})
    assert result.returncode == 2 and "--log-level must be one of DEBUG, INFO" in result.stderr
    assert "Traceback" not in result.stderr


####################################################################################
# Routes and the app factory
####################################################################################

def test_cors_preflight_and_responses_allow_the_configured_origin(start):
    server = start(cors_origins=["https://app.example"])
    preflight = requests.options(server.url + "/openai/chat/completions", timeout=5, headers={
        "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert preflight.status_code == 200
    assert preflight.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert "authorization" in preflight.headers["Access-Control-Allow-Headers"]
    models = requests.get(server.url + "/openai/models", headers={"Origin": "https://evil.example"}, timeout=5)
    assert "Access-Control-Allow-Origin" not in models.headers


def test_another_sites_page_cannot_drive_the_workflows_and_the_allowed_and_loopback_origins_can(start):
    server = start(cors_origins=["https://app.example"])
    body = json.dumps({"model": "trip-planner", "messages": [{"role": "user", "content": "Trip to Rome"}]})
    for path in ("/openai/chat/completions", "/openai/responses"):
        refused = requests.post(server.url + path, data=body, timeout=5,   # a browser's simple request
                                headers={"Origin": "http://evil.example", "Content-Type": "text/plain"})
        assert refused.status_code == 403, refused.text
        assert refused.json()["error"]["code"] == "origin_not_allowed" and "--cors-origin" in refused.json()["error"]["message"]
    for origin in ("https://app.example", "http://localhost:3000"):
        allowed = requests.post(server.url + "/openai/chat/completions", data=body, timeout=5,
                                headers={"Origin": origin, "Content-Type": "application/json"})
        assert allowed.status_code == 200, allowed.text
    assert requests.post(server.url + "/openai/chat/completions", data=body, timeout=5).status_code == 200


def test_the_home_page_lists_the_models_for_people_and_api_clients_are_told_where_the_api_is(start):
    secret = workflow(fixed_inputs={"api_token": "sk-hidden-1234567890abcdef"}, nodes=[
        {"id": "say", "type": "template", "inputs": {"template": "{word}", "word": {"query": "word"},
                                                     "token": {"fixed": "api_token"}}},
        {"id": "answer", "type": "output", "inputs": {"text": {"link": "say"}}}])
    server = start([secret])
    page = requests.get(server.url + "/", headers={"Accept": "text/html,application/xhtml+xml"}, timeout=5)
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    assert "<h3 class=\"model\">echo</h3>" in page.text and "A word to echo back." in page.text
    assert f"{server.url}/openai" in page.text and "sk-hidden" not in page.text and "api_token" not in page.text
    for method, path in (("GET", "/"), ("POST", "/v1/chat/completions"), ("GET", "/models")):
        response = requests.request(method, server.url + path, timeout=5)
        assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
        assert f"base URL {server.url}/openai" in response.json()["error"]["message"]


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_the_home_page_renders_in_a_real_browser(start, tmp_path):
    server = start()
    result = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                             "--no-first-run", "--disable-background-networking", "--disable-component-update",
                             "--disable-sync", f"--user-data-dir={tmp_path}", "--dump-dom", server.url + "/"],
                            capture_output=True, text=True, timeout=60)
    assert '<code id="base-url">' + server.url + "/openai</code>" in result.stdout, result.stderr[-2000:]
    assert result.stdout.count('class="model"') == 3 and "travel dates" in result.stdout


def test_the_no_argument_factory_logs_requests_when_nobody_configured_logging(tmp_path):
    code = ("import cozyopenai, wsgiref.util; app = cozyopenai.make_app(); environ = {}; "
            "wsgiref.util.setup_testing_defaults(environ); environ['PATH_INFO'] = '/openai/models'; "
            "b''.join(app(environ, lambda status, headers: None))")
    environment = {**os.environ, "COZYOPENAI_WORKFLOWS": WORKFLOWS_PATH, "COZYOPENAI_STORE": "memory",
                   "PYTHONPATH": HERE}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, cwd=tmp_path,
                            env=environment)
    assert "INFO GET /openai/models model=- conversation=- status=200" in result.stderr, result.stderr


def test_one_log_line_per_request_even_when_the_wsgi_server_configures_logging_later(tmp_path):
    # waitress-serve configures the root logger after loading the app
    result = python_with_the_module("get('/openai/models'); logging.basicConfig(); get('/openai/models')", tmp_path)
    assert result.stderr.count("GET /openai/models") == 2, result.stderr


####################################################################################
# Server and command line
####################################################################################

def test_the_llms_credentials_never_reach_the_log_at_start_up_nor_on_each_call(fake_llm):
    fake_llm.extractions = {"Trip to Oslo": {"destination": "Oslo"}}
    base = fake_llm.url.replace("http://", "http://alice:S3cretPassw0rd99@") + "/v1"
    with command_line_server("--store", "memory", "--llm-base-url", base, "--llm-model", "fake-model") as server:
        server_chat(server, "trip-planner", "Trip to Oslo")
        assert fake_llm.calls, "the LLM was never called"
        server.process.terminate()
        output = server.process.communicate(timeout=15)[0].decode()
    assert "S3cretPassw0rd99" not in output and "alice" not in output
    assert "HTTP Request" not in output and f"LLM: {fake_llm.url}/v1 model fake-model" in output


def test_the_built_in_server_gives_a_request_none_of_the_processes_environment():
    # wsgiref would copy every variable of the process (its secrets too) into each environ.
    seen = []

    def app(environ, start_response):
        seen.append(dict(environ))
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]
    server = Server(app)
    try:
        assert requests.get(server.url + "/look", timeout=5).text == "ok"
    finally:
        server.close()
    assert "PATH" in os.environ and not set(os.environ) & set(seen[0])
    assert seen[0]["PATH_INFO"] == "/look" and seen[0]["HTTP_HOST"].startswith("127.0.0.1")


def test_a_url_is_shown_without_its_user_password_or_query():
    assert cozyopenai.shown_url("http://alice:pw@127.0.0.1:8091/v1?api-key=QK") == "http://127.0.0.1:8091/v1"


def test_importing_the_module_has_no_side_effects(tmp_path):
    subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {HERE!r}); import cozyopenai"],
                   cwd=tmp_path, check=True, timeout=30)
    assert os.listdir(tmp_path) == []


def test_the_app_attribute_is_made_once_and_looking_at_it_does_nothing(tmp_path):
    result = python_with_the_module(
        "print(hasattr(cozyopenai, 'app'), cozyopenai.app is cozyopenai.app); print(os.listdir('.'))\n"
        "print([model['id'] for model in json.loads(get('/openai/models'))['data']])", tmp_path)
    assert result.stdout.splitlines() == ["True True", "[]", "['trip-planner', 'month-calendar', 'weather-now']"], \
        result.stderr
    assert os.listdir(tmp_path) == []


def test_the_app_attribute_answers_a_503_openai_error_when_it_cannot_start(tmp_path):
    result = python_with_the_module("statuses = []; body = get('/openai/models', statuses)\n"
                                    "print(statuses[0]); print(body.decode())", tmp_path,
                                    COZYOPENAI_WORKFLOWS=str(tmp_path / "missing.json"))
    status, body = result.stdout.split("\n", 1)
    assert status == "503 Service Unavailable" and "missing.json: cannot read it" in json.loads(body)["error"]["message"]


def test_a_second_client_is_answered_while_a_first_one_is_streaming(start):
    inside, release = threading.Event(), threading.Event()

    def wait(inputs, context):
        inside.set()
        release.wait(10)
        return "released"
    nodes = [{"id": "hold", "type": "wait", "inputs": {"w": {"query": "word"}}},
             {"id": "answer", "type": "output", "inputs": {"text": {"link": "hold"}}}]
    server = start([workflow(nodes=nodes)], node_types={"wait": cozyopenai.NodeType(wait)})
    result = {}
    first = threading.Thread(target=lambda: result.update(reply=Chat(server, "echo", stream=True).say("word: x")))
    first.start()
    assert inside.wait(10)
    assert requests.get(server.url + "/openai/models", timeout=5).status_code == 200   # while the stream waits
    release.set()
    first.join(10)
    assert answer_of(result["reply"]) == "released"


def start_up_lines(*arguments, until, seconds=15):
    """What ``python cozyopenai.py ARGUMENTS`` writes to stderr until a line holds ``until``."""
    process = subprocess.Popen([sys.executable, os.path.join(HERE, "cozyopenai.py"), *arguments], cwd=HERE,
                               stderr=subprocess.PIPE, text=True)
    try:
        return lines_within(process.stderr, seconds, until)
    finally:
        process.kill()
        process.wait(10)
        process.stderr.close()


def lines_within(stream, seconds, until):
    """The lines a child writes, read until one holds ``until`` or ``seconds`` pass: a
    readline() with a deadline, so a child that stays silent cannot hang the suite."""
    lines, found = [], threading.Event()

    def read():
        for line in iter(stream.readline, ""):
            lines.append(line)
            if until in line:
                found.set()
                return
    threading.Thread(target=read, daemon=True).start()
    found.wait(seconds)
    return list(lines)


def test_listening_beyond_loopback_without_a_key_warns(tmp_path):
    lines = start_up_lines("--host", "0.0.0.0", "--port", str(free_port()), "--store", "memory", until="no --api-key")
    assert any("listening on 0.0.0.0 with no --api-key" in line for line in lines), lines


def test_start_up_says_what_runs_and_warns_when_the_llm_does_not_answer(tmp_path):
    down = f"http://127.0.0.1:{free_port()}/v1"
    said = "".join(start_up_lines("--port", str(free_port()), "--store", str(tmp_path), "--llm-base-url", down,
                                  "--llm-model", "small", "--api-key", "k1", until="did not answer GET /models"))
    assert f"cozyopenai {cozyopenai.__version__}: 3 models (trip-planner, month-calendar, weather-now) from " \
           f"{WORKFLOWS_PATH}; store: JSON files in {tmp_path}; LLM: {down} model small; API keys: required" in said
    assert f"the LLM at 127.0.0.1:{down.split(':')[2].split('/')[0]} did not answer GET /models" in said
    assert "k1" not in said


def test_the_start_up_line_counts_one_model_in_the_singular():
    service = cozyopenai.make_app([workflow()], store="memory").config["cozyopenai.service"]
    assert f"cozyopenai {cozyopenai.__version__}: 1 model (echo) from " in cozyopenai.startup_summary(service)


def test_a_port_in_use_gets_one_line_not_a_traceback():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = subprocess.run([sys.executable, os.path.join(HERE, "cozyopenai.py"), "--store", "memory", "--port",
                                 str(taken.getsockname()[1])], capture_output=True, text=True, timeout=30, cwd=HERE)
    assert result.returncode == 2 and "cannot listen on 127.0.0.1:" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_an_unknown_server_name_exits_with_a_clear_message():
    result = subprocess.run([sys.executable, os.path.join(HERE, "cozyopenai.py"), "--store", "memory",
                             "--server", "no-such-server"], capture_output=True, text=True, timeout=30, cwd=HERE)
    assert result.returncode == 2 and "unknown --server 'no-such-server'" in result.stderr


def test_python_cozyopenai_py_serves_the_shipped_workflows_with_the_json_store(tmp_path):
    shutil.copy(WORKFLOWS_PATH, tmp_path / "workflows.json")
    with command_line_server(cwd=tmp_path) as server:
        client = OpenAI(api_key="unused", base_url=server.url + "/openai")
        stream = client.chat.completions.create(
            model="trip-planner", messages=[{"role": "user", "content": "I want to plan a trip to Paris."}],
            stream=True)
        reply = "".join(chunk.choices[0].delta.content or "" for chunk in stream)
    assert "Got it: destination Paris." in reply
    assert len([name for name in os.listdir(tmp_path / "conversations") if name.endswith(".json")]) == 1


####################################################################################
# The README's examples, run as written
####################################################################################

def readme_blocks(language):
    with open(os.path.join(HERE, "README.md")) as handle:
        return re.findall(r"```" + language + r"\n(.*?)```", handle.read(), re.S)


def test_readme_test_command_is_the_one_ci_runs():
    with open(os.path.join(HERE, ".ci", "run")) as handle:
        ci = handle.read()
    with open(os.path.join(HERE, "README.md")) as handle:
        readme = handle.read()
    (command,) = [line for line in ci.splitlines() if "pytest" in line and "test_cozyopenai.py" in line]   # CI's
    assert command.startswith("pip install -r requirements.txt ") and f"```\n{command}\n```" in readme


def test_readme_workflow_example_loads_and_answers(start):
    (example,) = [block for block in readme_blocks("json") if '"workflows"' in block]
    chat = Chat(start(json.loads(example)), "greeter")
    assert answer_of(chat.say("person: Ada")) == "Hello Ada! (friendly, x1) Best wishes from the cozyopenai team."
    assert "(formal, x3)" in answer_of(chat.say("tone: formal\ntimes: 3"))


def test_readme_python_client_example_runs_as_written(start):
    (example,) = [block for block in readme_blocks("python") if "chat.completions.create" in block]
    server = start()
    code = example.replace("http://127.0.0.1:8000", server.url)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Agent is responding...\n<thinking>")
    assert "Got it: destination Paris." in result.stdout and result.stdout.endswith("Stream finished.\n")


@pytest.mark.parametrize("marker, expected", [("previous_response_id=first.id", "## Your trip to Paris"),
                                               ("conversations.create", "## Your trip to Paris"),
                                               ("OpenAIResponsesModel", "## Your trip to Paris"),
                                               ("elicitation_callback", "## Your trip to Lisbon")])
def test_readme_responses_and_mcp_examples_run_as_written(start, marker, expected):
    (example,) = [block for block in readme_blocks("python") if marker in block]
    server = start()
    result = subprocess.run([sys.executable, "-c", example.replace("http://127.0.0.1:8000", server.url)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert expected in result.stdout and "<thinking>" not in result.stdout


def test_readme_embedding_example_runs_as_written():
    (example,) = [block for block in readme_blocks("python") if "make_app(" in block]
    assert example.rstrip().endswith("server.serve_forever()")
    example = example.replace("server.serve_forever()", "server.server_close()")   # the test does not wait forever
    result = subprocess.run([sys.executable, "-c", example], capture_output=True, text=True, timeout=30, cwd=HERE)
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(r"listening on port \d+\n", result.stdout)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_readme_curl_examples_run_as_written(start):
    server = start()
    examples = readme_blocks("bash")
    assert any(example.lstrip().startswith("curl ") for example in examples), "README.md shows no curl example"
    for example in examples:
        command = example.replace("http://127.0.0.1:8000", server.url)
        result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        assert result.stdout.endswith("data: [DONE]\n\n") or json.loads(result.stdout)["object"] == "list"


####################################################################################
# The benchmark, run as the README gives it
####################################################################################

def test_readme_benchmark_command_runs_and_prints_every_figure_with_its_target():
    (command,) = [block.strip() for block in re.findall(r"```\n(python bench/[^\n]*)\n```", open(
        os.path.join(HERE, "README.md")).read())]
    quick = ["--runs", "1", "--seconds", "0.2", "--conversations", "50", "--latency-scale", "0.1",
             "--only", "overhead,ttfb,parallel,storage,llm,latency,calls,startup"]   # the figures, not their precision
    result = subprocess.run([sys.executable, *command.split()[1:], *quick], capture_output=True, text=True,
                            timeout=60, cwd=HERE)
    assert result.returncode == 0, result.stderr
    for figure in ("memory store, vs bare", "json store, vs bare", "first byte", "progress line", "whole turn",
                   "turn latency", "start-up,", "single call, turn 1: 1 gathering call", "import cozyopenai",
                   "first answer", "first visible byte of a gathering turn", "gathering turn vs one bare call",
                   "run turn vs its bare extraction call", "gathering turn, the document's first message"):
        assert re.search(re.escape(figure) + r".*(target|prompt tokens)", result.stdout), figure


####################################################################################
# The edge: malformed bytes, slow clients, shutdowns
####################################################################################

EDGE_BODY = b'{"model": "trip-planner", "messages": [{"role": "user", "content": "hi"}]}'
EDGE_ROUTES = [("POST", "/openai/chat/completions"), ("POST", "/openai/responses"), ("POST", "/mcp"),
               ("GET", "/openai/models"), ("GET", "/openai/responses/resp_x"), ("DELETE", "/mcp")]
QUICK_LIMITS = cozyopenai.ServerLimits(request_line_seconds=0.5, header_seconds=0.5, body_pause_seconds=0.5)


def raw_exchange(server, data, seconds=5.0, half_close=False):
    """Bytes sent on a raw socket (then, with ``half_close``, the end of what the client sends),
    and the server's whole answer: its status, headers and body. ``seconds`` is the deadline
    for the answer, which fails the test."""
    port = int(server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=seconds) as sock:
        sock.sendall(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        answer, deadline = b"", time.monotonic() + seconds
        while True:
            assert time.monotonic() < deadline, f"no answer in {seconds} s: {answer[:200]!r}"
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    headers = dict(line.split(": ", 1) for line in head.decode("latin-1").split("\r\n")[1:] if ": " in line)
    return status, headers, body


def assert_protocol_error(path, status, headers, body, expected=None):
    """A 4xx in the protocol's own form: an OpenAI error object, or a JSON-RPC error on /mcp."""
    assert 400 <= status < 500 and (expected is None or status == expected), (status, body[:300])
    assert headers["Content-Type"] == "application/json", headers
    error = json.loads(body)
    if path.startswith("/mcp"):
        assert error["jsonrpc"] == "2.0" and error["error"]["code"] == -32600 and error["error"]["message"]
    else:
        assert set(error["error"]) == {"message", "type", "param", "code"} and error["error"]["message"]
    return error


def request_bytes(method, path, headers=b"", body=EDGE_BODY):
    return (method.encode() + b" " + path.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\n" + headers + b"\r\n" + body)


BAD_FRAMING = {
    "length abc": (b"Content-Length: abc\r\n", 400),
    "length 1e3": (b"Content-Length: 1e3\r\n", 400),
    "length 5, 5": (b"Content-Length: 5, 5\r\n", 400),
    "length 0x10": (b"Content-Length: 0x10\r\n", 400),
    "length negative": (b"Content-Length: -74\r\n", 400),
    "two lengths": (b"Content-Length: 74\r\nContent-Length: 74\r\n", 400),
    "length and chunked": (b"Content-Length: 74\r\nTransfer-Encoding: chunked\r\n", 400),
    "gzip coding": (b"Transfer-Encoding: gzip\r\n", 400),
    "two codings": (b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", 400),
    "a header line over 64 KiB": (b"X-Big: " + b"a" * 70_000 + b"\r\n", 431),
    "headers over 64 KiB in all": (b"".join(b"X-F%d: %s\r\n" % (i, b"b" * 900) for i in range(80)), 431),
    "over 100 header fields": (b"".join(b"X-F%d: 1\r\n" % i for i in range(120)), 431),
}


def test_malformed_framing_on_every_route_is_a_4xx_in_the_protocols_form(start):
    server, seen = start(), []
    for method, path in EDGE_ROUTES:
        for case, (headers, expected) in BAD_FRAMING.items():
            status, response_headers, body = raw_exchange(server, request_bytes(method, path, headers))
            assert_protocol_error(path, status, response_headers, body, expected)
            seen.append(status)
        chunked = b"zz\r\nabc\r\n0\r\n\r\n"   # a chunk size that is not hexadecimal
        status, response_headers, body = raw_exchange(
            server, request_bytes(method, path, b"Transfer-Encoding: chunked\r\n", chunked))
        if method == "POST":
            assert_protocol_error(path, status, response_headers, body, 400)
    short = raw_exchange(server, request_bytes("POST", "/openai/chat/completions", b"Content-Length: 500\r\n"),
                         half_close=True)   # fewer bytes than announced, then the client's end
    for answer in (raw_exchange(server, b"GARBAGE\r\n\r\n"), raw_exchange(server, b"GET /" + b"a" * 70_000 +
                                                                              b" HTTP/1.1\r\n\r\n")):
        assert_protocol_error("/", *answer)
    error = assert_protocol_error("/openai", *short, 400)
    assert "ended after 74 of the 500 bytes" in error["error"]["message"]
    assert len(seen) == len(EDGE_ROUTES) * len(BAD_FRAMING) and max(seen) < 500
    good = EDGE_BODY
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(good), good)   # well-formed chunked bodies are read
    status, _, body = raw_exchange(server, request_bytes("POST", "/openai/chat/completions",
                                                         b"Transfer-Encoding: chunked\r\n", chunked))
    assert status == 200 and json.loads(body)["object"] == "chat.completion"


def test_stalled_requests_on_every_route_are_answered_408_in_time_and_closed(start):
    server = start(limits=QUICK_LIMITS)
    port, began, stalled = int(server.url.rsplit(":", 1)[1]), time.monotonic(), []
    for path in ("/openai/chat/completions", "/openai/responses", "/mcp"):
        for sent, form in ((b"", "/"), (b"POST " + path.encode(), "/"),   # nothing, half a request line
                           (request_bytes("POST", path, b"X-Slow: 1\r\n", b"")[:-2], path),   # headers unfinished
                           (request_bytes("POST", path, b"Content-Length: 200\r\n", EDGE_BODY[:20]), path)):
            sock = socket.create_connection(("127.0.0.1", port), timeout=3)   # each read's deadline
            sock.sendall(sent)
            stalled.append((sock, form))
    for sock, form in stalled:
        with sock:
            answer = b""
            while chunk := sock.recv(65536):   # the answer, then the close
                answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        headers = dict(line.split(": ", 1) for line in head.decode().split("\r\n")[1:])
        assert_protocol_error(form, int(head.split(b" ")[1]), headers, body, 408)
    assert time.monotonic() - began < 2.5
    assert server.post({"model": "trip-planner", "messages": [{"role": "user", "content": "hi"}]}).status_code == 200


def test_a_reply_leaves_in_one_send_and_a_streams_head_with_its_first_chunk(start):
    # wsgiref writes a reply's status line, date, server name, header fields and body one by
    # one; the server sends them as one, so on loopback the client's first read holds it all.
    server = start(cors_origins=["https://app.example"])
    port = int(server.url.rsplit(":", 1)[1])
    streamed = json.dumps({"model": "trip-planner", "stream": True,
                           "messages": [{"role": "user", "content": "hi"}]}).encode()
    preflight = (b"OPTIONS /openai/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nOrigin: https://app.example\r\n"
                 b"Access-Control-Request-Method: POST\r\n\r\n")   # an empty body: the head alone
    firsts, laters = {}, {}   # each answer's first read, and what came after it
    for case, data in (("whole", request_bytes("POST", "/openai/chat/completions",
                                               b"Content-Length: %d\r\n" % len(EDGE_BODY))),
                       ("stream", request_bytes("POST", "/openai/chat/completions",
                                                b"Content-Length: %d\r\n" % len(streamed), streamed)),
                       ("preflight", preflight)):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:   # each read's deadline
            sock.sendall(data)
            firsts[case], laters[case] = sock.recv(65536), b""
            while chunk := sock.recv(65536):
                laters[case] += chunk
    head, _, body = firsts["whole"].partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200") and json.loads(body)["object"] == "chat.completion"
    assert laters["whole"] == b""   # nothing came after the first read
    head, _, body = firsts["stream"].partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200") and b"text/event-stream" in head and body.startswith(b"data: {")
    assert laters["stream"].endswith(b"data: [DONE]\n\n")
    head, _, body = firsts["preflight"].partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200") and b"Content-Length: 0" in head and body == b""
    assert b"Access-Control-Allow-Origin: https://app.example" in head


def thread_count():
    return threading.active_count()


def test_400_stalled_connections_do_not_hold_400_threads_nor_delay_a_normal_request(start):
    server = start(limits=cozyopenai.ServerLimits(header_seconds=5, body_pause_seconds=2.0))
    port, before = int(server.url.rsplit(":", 1)[1]), thread_count()
    stalled = []
    try:
        for _ in range(400):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(request_bytes("POST", "/openai/chat/completions", b"Content-Length: 500\r\n", b'{"mo'))
            stalled.append(sock)
        began = time.monotonic()
        reply = server.post({"model": "trip-planner", "messages": [{"role": "user", "content": "Paris"}]})
        assert reply.status_code == 200 and time.monotonic() - began < 2   # not held until they time out (2 s)
        statuses = []
        for sock in stalled:
            answer = b""
            while not answer.endswith(b"}") and len(answer) < 4096:
                chunk = sock.recv(4096)   # each socket's timeout (10 s) is the test's deadline
                if not chunk:
                    break
                answer += chunk
            statuses.append(int(answer.split(b" ", 2)[1]))
        assert statuses == [408] * 400 and time.monotonic() - began < 8
    finally:
        for sock in stalled:
            sock.close()
    deadline = time.monotonic() + 5
    while thread_count() > before + cozyopenai.IDLE_THREADS_KEPT + 2:
        assert time.monotonic() < deadline, f"{thread_count()} threads, {before} before the 400 connections"
        time.sleep(0.05)


def test_past_the_connection_cap_a_new_connection_gets_a_503_at_once(start):
    server = start(limits=cozyopenai.ServerLimits(header_seconds=3, max_connections=4))
    port = int(server.url.rsplit(":", 1)[1])
    held = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(4)]
    try:
        for sock in held:
            sock.sendall(b"POST /openai/chat/completions HTTP/1.1\r\n")   # headers still to come
        time.sleep(0.1)
        for path in ("/openai/models", "/mcp"):
            began = time.monotonic()
            status, headers, body = raw_exchange(server, request_bytes("POST", path), seconds=3)
            assert status == 503 and headers["Retry-After"] == "1" and time.monotonic() - began < 1.5
            error = json.loads(body)
            assert "4 connections open" in (error["error"]["message"])
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 5
    while requests.get(server.url + "/health", timeout=5).status_code != 200:   # served again once they left
        assert time.monotonic() < deadline
        time.sleep(0.05)


def _any_json():
    """Any small JSON value: what a fuzzed field holds when it is not one of the shapes tried."""
    from hypothesis import strategies as st
    scalars = st.none() | st.booleans() | st.integers() | st.text(max_size=20)
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) |
                        st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)


def _responses_bodies():
    from hypothesis import strategies as st
    anything = _any_json()
    part = st.fixed_dictionaries({"type": st.sampled_from(["input_text", "input_image", "x"]), "text": anything})
    item = st.fixed_dictionaries({}, optional={"role": st.sampled_from(["user", "assistant", "tool"]) | anything,
                                               "content": st.text(max_size=40) | st.lists(part, max_size=2) | anything,
                                               "type": st.sampled_from(["message", "reasoning", "item_reference"]) |
                                               anything, "id": st.sampled_from(["msg_" + "a" * 40, "rs_x"]) | anything})
    body = st.fixed_dictionaries({}, optional={
        "model": st.sampled_from(["trip-planner", "nope"]) | anything, "input": st.text(max_size=40) |
        st.lists(item, max_size=3) | anything, "stream": st.booleans() | anything, "store": anything,
        "previous_response_id": st.sampled_from(["resp_x", ""]) | anything, "metadata": anything,
        "conversation": st.sampled_from(["conv_" + "a" * 32, "conv_x"]) | anything, "background": st.booleans() |
        anything, "truncation": st.sampled_from(["auto", "x"]) | anything, "tools": anything})
    return body.map(lambda value: json.dumps(value).encode()) | st.binary(max_size=48)


def _conversations_bodies():
    from hypothesis import strategies as st
    anything = _any_json()
    item = st.fixed_dictionaries({}, optional={"role": st.sampled_from(["user", "assistant"]) | anything,
                                               "content": st.text(max_size=20) | anything,
                                               "type": st.sampled_from(["message", "reasoning"]) | anything})
    body = st.fixed_dictionaries({}, optional={"items": st.lists(item, max_size=3) | anything, "metadata": st.dictionaries(
        st.text(max_size=8), st.text(max_size=8), max_size=3) | anything})
    return body.map(lambda value: json.dumps(value).encode()) | st.binary(max_size=48)


def _mcp_bodies():
    from hypothesis import strategies as st
    anything = _any_json()
    arguments = st.dictionaries(st.sampled_from(["destination", "budget", "pace", "children", "request", "x"]),
                                anything, max_size=4) | anything
    params = st.fixed_dictionaries({}, optional={"name": st.sampled_from(["trip-planner", "weather-now", ""]) |
                                                 anything, "arguments": arguments, "_meta": anything})
    message = st.fixed_dictionaries({"jsonrpc": st.sampled_from(["2.0", "1.0"]) | anything}, optional={
        "id": st.integers(0, 9) | anything, "method": st.sampled_from(["tools/call", "tools/list", "ping", "x"]) |
        anything, "params": params | anything, "result": anything})
    return message.map(lambda value: json.dumps(value).encode()) | st.binary(max_size=48)


EDGE_FUZZED = 30   # per route and store; the suite's other fuzz test sends a thousand chat bodies


@pytest.mark.parametrize("store", ["memory", "json"])
def test_fuzzed_bodies_on_every_route_and_store_get_4xx_protocol_errors_and_never_a_5xx(start, store, tmp_path):
    from hypothesis import HealthCheck, given, settings
    server = start(store="memory" if store == "memory" else str(tmp_path / "conversations"))
    session = requests.Session()
    initialized = session.post(server.url + "/mcp", timeout=10, json={"jsonrpc": "2.0", "id": 0, "method": "initialize",
                                                                      "params": {"capabilities": {}}})
    mcp_headers = {"Mcp-Session-Id": initialized.headers["Mcp-Session-Id"], "Content-Type": "application/json",
                   "Accept": "application/json"}
    seen = []

    def check(path, body, headers):
        response = session.post(server.url + path, data=body, headers=headers, timeout=10)
        seen.append(response.status_code)
        assert response.status_code < 500, response.text[:300]
        if response.status_code >= 400 and path == "/mcp":
            assert response.json()["error"]["message"]
        elif response.status_code >= 400:
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}
        if response.status_code >= 400:   # types named as JSON names them, on every route
            assert not PYTHON_TYPE_NAME.search(response.json()["error"]["message"]), response.text[:300]
        elif response.headers["Content-Type"].startswith("text/event-stream"):
            assert response.headers["Content-Type"] == "text/event-stream; charset=utf-8"
            assert response.text.endswith(("data: [DONE]\n\n", "response.completed", "\n\n"))
            assert "response.failed" not in response.text and '"error": {' not in response.text.split("\n")[0]

    conversation = server.client.conversations.create().id

    @settings(max_examples=EDGE_FUZZED, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(chat=_bodies(), responses=_responses_bodies(), mcp=_mcp_bodies(), conversations=_conversations_bodies())
    def fuzz(chat, responses, mcp, conversations):
        check("/openai/chat/completions", chat, {"Content-Type": "application/json"})
        check("/openai/responses", responses, {"Content-Type": "application/json"})
        check("/mcp", mcp, mcp_headers)
        for path in ("/openai/conversations", f"/openai/conversations/{conversation}",
                     f"/openai/conversations/{conversation}/items"):
            check(path, conversations, {"Content-Type": "application/json"})
    fuzz()
    assert len(seen) >= 6 * EDGE_FUZZED and any(status >= 400 for status in seen)
    assert "Where would you like to go?" in Chat(server).say("I want to plan a trip.")


SLOW_WORKFLOW = workflow(name="slow", nodes=[
    {"id": "wait", "type": "python", "inputs": {"function": "time:sleep", "0": 30}},
    {"id": "say", "type": "template", "inputs": {"template": "{word}{nothing}", "word": {"query": "word"},
                                                 "nothing": {"link": "wait"}}},
    {"id": "answer", "type": "output", "inputs": {"text": {"link": "say"}}}])


class RawStream:
    """A streamed POST on a raw socket, its bytes gathered by a thread as they arrive (HTTP
    clients buffer them), so a test can wait for what it expects with a deadline."""

    def __init__(self, url, path, body):
        host, port = url.rsplit("/", 1)[1].split(":")
        data = json.dumps(body).encode()
        self.sock = socket.create_connection((host, int(port)), timeout=15)
        self.sock.sendall(b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: %d"
                          b"\r\n\r\n%s" % (path.encode(), host.encode(), len(data), data))
        self.data, self.ended, self.changed = b"", False, threading.Condition()
        threading.Thread(target=self._gather, daemon=True).start()

    def _gather(self):
        try:
            while chunk := self.sock.recv(65536):
                with self.changed:
                    self.data += chunk
                    self.changed.notify_all()
        except OSError:
            pass
        with self.changed:
            self.ended = True
            self.changed.notify_all()

    def text_until(self, marker, seconds):
        with self.changed:
            found = self.changed.wait_for(lambda: marker.encode() in self.data or self.ended, seconds)
            assert found and marker.encode() in self.data, f"{marker!r} not seen in {seconds} s: {self.data[-300:]!r}"
            return self.data.decode("utf-8")

    def wait_end(self, seconds):
        with self.changed:
            assert self.changed.wait_for(lambda: self.ended, seconds), "the stream did not end in time"
            return self.data.decode("utf-8")


def test_sigterm_mid_stream_ends_each_stream_with_an_error_and_its_end_event_and_exits_0(tmp_path):
    quick = dict(json.loads(json.dumps(SLOW_WORKFLOW).replace('"0": 30', '"0": 0.4')), name="quick")
    (tmp_path / "workflows.json").write_text(json.dumps({"workflows": [SLOW_WORKFLOW, quick]}))
    with command_line_server("--workflows", str(tmp_path / "workflows.json"), "--store", str(tmp_path / "chats"),
                             "--shutdown-grace", "0.8", cwd=tmp_path) as server:
        said = [{"role": "user", "content": "word: hi"}]
        chat = RawStream(server.url, "/openai/chat/completions", {"model": "slow", "stream": True, "messages": said})
        response = RawStream(server.url, "/openai/responses", {"model": "slow", "stream": True, "input": "word: hi"})
        finishing = RawStream(server.url, "/openai/chat/completions", {"model": "quick", "stream": True,
                                                                        "messages": said})
        client_saw = []

        def with_the_openai_client():   # the library a client would use raises the cut as an error
            client = OpenAI(api_key="unused", base_url=server.url + "/openai", timeout=10, max_retries=0)
            try:
                for chunk in client.chat.completions.create(model="slow", messages=said, stream=True):
                    client_saw.append(chunk.choices[0].delta.content or "")
            except openai.APIError as exc:
                client_saw.append(exc)
        reader = threading.Thread(target=with_the_openai_client, daemon=True)
        reader.start()
        assert "Content-Type: text/event-stream; charset=utf-8" in chat.text_until("wait started", 5)
        response.text_until("wait started", 5)
        finishing.text_until("wait started", 5)
        deadline = time.monotonic() + 5
        while "".join(text for text in client_saw if isinstance(text, str)).count("wait started") < 1:
            assert time.monotonic() < deadline, client_saw
            time.sleep(0.02)
        server.process.send_signal(signal.SIGTERM)
        seen_chat, seen_response, seen_finished = chat.wait_end(5), response.wait_end(5), finishing.wait_end(5)
        reader.join(5)
        assert server.process.wait(10) == 0
        log = server.process.stdout.read().decode()
    assert '"code": "server_shutting_down"' in seen_chat and seen_chat.rstrip().endswith("data: [DONE]")
    assert '"finish_reason": "stop"' not in seen_chat   # told from a finished stream, which has one:
    assert '"finish_reason": "stop"' in seen_finished and "shutting" not in seen_finished
    failed = json.loads(seen_response.rstrip().split("data: ")[-1])
    assert failed["type"] == "response.failed" and failed["response"]["status"] == "failed"
    assert failed["response"]["error"]["message"].startswith("The server is shutting down")
    assert "response.completed" not in seen_response
    assert isinstance(client_saw[-1], openai.APIError) and "shutting down" in str(client_saw[-1])
    assert "SIGTERM: shutting down" in log and "3 replies cut short" in log and "Traceback" not in log
    assert not [name for name in os.listdir(tmp_path / "chats") if name.endswith(".tmp")]


def test_a_restart_removes_the_temporary_files_killed_saves_left_and_counts_them(tmp_path):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          timeout=30)
    dead_pid, store = int(gone.stdout), tmp_path / "chats"
    store.mkdir()
    conversation = "A" * 32
    (store / f"{conversation}.json").write_text("{}")
    (store / ".saving").mkdir()   # where saves are written before they are renamed into place
    leftovers = [store / ".saving" / f"{conversation}.json.{dead_pid}-{n}.tmp" for n in (1, 2, 3)]
    live = store / ".saving" / f"{conversation}.json.{os.getpid()}-9.tmp"   # a live worker's save in progress
    for path in leftovers + [live]:
        path.write_text('{"half": ')
    said = cozyopenai.startup_summary(cozyopenai.make_app(WORKFLOWS_PATH, store=str(store)).config["cozyopenai.service"])
    assert f"store: JSON files in {store} (3 temporary files of unfinished saves removed)" in said
    assert sorted(os.listdir(store)) == sorted([".locks", ".saving", f"{conversation}.json"])
    assert os.listdir(store / ".saving") == [live.name]


def test_encoded_copies_of_secrets_are_redacted_in_replies_thinking_logs_and_errors(start, fake_llm, caplog):
    import base64
    from urllib.parse import quote, quote_plus
    key, header = "Ab3/de+fGh9=ij12KLmn", 'Qw3"rt\\yU7-op9aSd5'
    encoded = {"quote": quote(key, safe=""), "plus": quote_plus(key), "json": json.dumps(header)[1:-1],
               "b64": base64.b64encode(key.encode()).decode(), "hex": key.encode().hex(),
               "basic": base64.b64encode(b"user:" + key.encode()).decode()}
    fake_llm.http_routes["/echo"] = (200, {name: f"key={value}" for name, value in encoded.items()})
    secrets = {"api_key": key, "headers": {"X-Header": header}}
    echo = workflow(name="echo", fixed_inputs=secrets, nodes=[
        {"id": "fetch", "type": "http", "inputs": {"url": fake_llm.url + "/echo?w={word}", "word": {"query": "word"},
                                                 "headers": {"fixed": "headers"}}},
        {"id": "say", "type": "template", "inputs": {"template": " ".join(f"{{r.{name}}}" for name in encoded),
                                                     "r": {"link": "fetch"}}},
        {"id": "answer", "type": "output", "inputs": {"text": {"link": "say"}}}])
    say = {"id": "say", "type": "template", "inputs": {"template": "{word}", "word": {"query": "word"}}}
    broken = workflow(name="broken", fixed_inputs=secrets, nodes=[say,   # an error that quotes the secret, encoded
        {"id": "parse", "type": "python", "inputs": {"function": "ipaddress:ip_address", "0": "key=" + encoded["quote"]}},
        {"id": "answer", "type": "output", "inputs": {"text": {"link": "say"}, "a": {"link": "parse"}}}])
    leaking = workflow(name="leaking", fixed_inputs=secrets, nodes=[say,
        {"id": "leak", "type": "leaky", "inputs": {"text": "key=" + encoded["b64"], "after": {"link": "say"}}},
        {"id": "answer", "type": "output", "inputs": {"text": {"link": "leak"}}}])

    def leaky(inputs, context):   # a custom node's bug: its exception is logged with its traceback
        raise RuntimeError(f"upstream answered {inputs['text']}")
    server = start({"workflows": [echo, broken, leaking]}, node_types={"leaky": cozyopenai.NodeType(leaky)})
    for stream in (False, True):
        reply = ask(server, "echo", [{"role": "user", "content": "word: hi"}], stream=stream)
        assert reply.count("[redacted]") >= len(encoded), reply
        for value in encoded.values():
            assert value not in reply and value[8:20] not in reply, value
    failed = ask(server, "broken", [{"role": "user", "content": "word: hi"}])
    assert "ValueError: 'key=[redacted]'" in failed and encoded["quote"] not in failed
    with caplog.at_level("ERROR", logger="cozyopenai"):
        leaked = ask(server, "leaking", [{"role": "user", "content": "word: hi"}])
    assert "RuntimeError: upstream answered key=[redacted]" in caplog.text and encoded["b64"] not in caplog.text
    assert encoded["b64"] not in leaked


def test_with_a_key_the_home_page_shows_no_model_and_any_api_path_is_401_first(start):
    server = start(api_keys=["k1"])
    page = requests.get(server.url + "/", headers={"Accept": "text/html"}, timeout=5)
    assert page.status_code == 200 and "Authorization: Bearer" in page.text and "/openai" in page.text
    for name in ("trip-planner", "month-calendar", "weather-now", "destination", "Budget"):
        assert name not in page.text
    for path in ("/openai/nope", "/openai", "/openai/v1/nothing/here", "/mcp/nope"):
        response = requests.get(server.url + path, timeout=5)
        assert_protocol_error(path, response.status_code, response.headers, response.content, 401)
    assert requests.options(server.url + "/openai/nope", timeout=5).status_code == 401   # no CORS: no preflight
    assert requests.get(server.url + "/openai/nope", headers={"Authorization": "Bearer k1"},
                        timeout=5).status_code == 404


def test_start_up_refusals_are_one_line_and_exit_2(tmp_path, capsys):
    bad_bounds = workflow(query_inputs={"n": {"description": "A number.", "type": "number", "minimum": 10,
                                              "maximum": 1}},
                          nodes=[{"id": "say", "type": "template", "inputs": {"template": "{n}", "n": {"query": "n"}}},
                                 {"id": "answer", "type": "output", "inputs": {"text": {"link": "say"}}}])
    bad_header = workflow(nodes=[
        {"id": "get", "type": "http", "inputs": {"url": "http://127.0.0.1:9/{word}", "word": {"query": "word"},
                                               "headers": {"X-Key": {"an": "object"}}}},
        {"id": "answer", "type": "output", "inputs": {"text": {"link": "get"}}}])
    (tmp_path / "bounds.json").write_text(json.dumps({"workflows": [bad_bounds]}))
    (tmp_path / "header.json").write_text(json.dumps({"workflows": [bad_header]}))
    (tmp_path / "deep.json").write_text('{"workflows": ' + "[" * 5000 + "]" * 5000 + "}")
    for name, message in (("bounds.json", "'minimum' (10) is above 'maximum' (1)"),
                          ("header.json", "header 'X-Key' must be a string, not an object"),
                          ("deep.json", "nested too deeply")):
        assert cozyopenai.main(["--workflows", str(tmp_path / name), "--store", "memory", "--port", "0"]) == 2
        said = capsys.readouterr().err
        assert message in said and len(said.strip().splitlines()) == 1, said
    missing = ("import runpy, sys; sys.modules['bottle'] = None; sys.argv = ['cozyopenai.py']; "
               f"runpy.run_path({os.path.join(HERE, 'cozyopenai.py')!r}, run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", missing], capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert result.returncode == 2 and result.stderr == (
        "cozyopenai: the package bottle is missing; install what it needs with: pip install -r requirements.txt\n")


def mcp_raw(server):
    """post(message) on a raw MCP session (JSON answers), for the protocol's own errors."""
    initialized = requests.post(server.url + "/mcp", timeout=10, json={
        "jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {"capabilities": {}}})
    headers = {"Mcp-Session-Id": initialized.headers["Mcp-Session-Id"], "Accept": "application/json"}
    return lambda message: requests.post(server.url + "/mcp", json={"jsonrpc": "2.0", "id": 1, **message},
                                         headers=headers, timeout=10)


def test_no_silent_acceptance_at_the_edge(start):
    server = start()
    typed = server.post({"model": 1, "messages": [{"role": "user", "content": "hi"}]})
    assert typed.status_code == 400 and "'model' must be a string" in typed.json()["error"]["message"]
    assert typed.json()["error"]["param"] == "model"
    responses = requests.post(server.url + "/openai/responses", json={"model": ["x"], "input": "hi"}, timeout=10)
    assert responses.status_code == 400 and "'model' must be a string" in responses.json()["error"]["message"]
    post = mcp_raw(server)
    nameless = post({"method": "tools/call", "params": {"arguments": {}}}).json()
    assert nameless["error"]["code"] == -32602 and "tool name is missing" in nameless["error"]["message"]
    listed = post({"method": "tools/call", "params": {"name": "trip-planner", "arguments": []}}).json()
    assert listed["error"]["code"] == -32602 and "'arguments' must be an object" in listed["error"]["message"]
    given = {"destination": "Lisbon", "budget": "1200 EUR", "travel_dates": "May"}
    for name, value in (("pace", "warp"), ("children", "maybe")):
        result = post({"method": "tools/call", "params": {"name": "trip-planner",
                                                          "arguments": {**given, name: value}}}).json()["result"]
        assert result["isError"] and f"the argument {name!r} is not valid" in result["content"][0]["text"]
    fine = post({"method": "tools/call", "params": {"name": "trip-planner", "arguments": given}}).json()["result"]
    assert not fine["isError"] and "Lisbon" in fine["content"][0]["text"]
    stream = requests.post(server.url + "/openai/chat/completions", timeout=10, json={
        "model": "trip-planner", "stream": True, "messages": [{"role": "user", "content": "Un voyage à Zürich ☀"}]})
    assert stream.headers["Content-Type"] == "text/event-stream; charset=utf-8" and "Zürich" in stream.text


def test_a_labelled_number_in_an_ascii_text_is_found_as_with_the_word_boundary_first():
    texts = ["count: 3", "the count of 5", "recount: 4", "count3", "_count 2", "a count, 7; budget: 9", "counts: 2",
             "COUNT: 1".lower(), "x-count: 6", "budget 1200 and count 2"]
    for labels in (["count"], ["count", "budget"], ["travel[\\s_-]+dates", "count"], ["nombre", "count"]):
        fast = re.compile(cozyopenai._ascii_label_pattern(labels) + cozyopenai.LABELLED_NUMBER)
        slow = re.compile(r"(?i:\b(?:" + "|".join(labels) + r"))" + cozyopenai.LABELLED_NUMBER)
        for text in texts:
            found, expected = fast.search(text), slow.search(text)
            assert (found and (found.span(), found.groups())) == (expected and (expected.span(), expected.groups())), text
