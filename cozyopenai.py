"""cozyopenai: serve workflows as conversational, OpenAI-compatible chat models.

A workflow is a small graph of nodes (text templates, LLM calls, HTTP calls,
Python functions) described in ``workflows.json``. Each workflow is exposed as
a chat "model". When a user talks to it, the server works out which of the
workflow's query inputs the user has given, asks for the missing ones, then
runs the workflow and streams its progress inside a ``<thinking>`` block
before the answer. Any OpenAI client can talk to it by changing its base URL.

Run it (the JSON conversation store goes to ./conversations)::

    pip install bottle openai requests
    python cozyopenai.py --port 8000

Talk to it::

    from openai import OpenAI
    client = OpenAI(api_key="unused", base_url="http://127.0.0.1:8000/openai")
    reply = client.chat.completions.create(
        model="trip-planner",
        messages=[{"role": "user", "content": "I want to plan a trip to Paris."}],
    )
    print(reply.choices[0].message.content)

Embed it: ``make_app(workflows=..., store=..., llm=LLMSettings(...))`` returns a
Bottle application, which is a WSGI callable that can be run, merged or
mounted. Called with no arguments, ``make_app()`` reads the same COZYOPENAI_*
environment variables as the command line, for WSGI servers::

    gunicorn --threads 16 'cozyopenai:make_app()'

Security: by default the OpenAI routes need no key, so the server binds to
loopback. Give ``--api-key`` before listening anywhere else. Fixed inputs
(API keys and the like) are never shown to chat users, but anyone who can
edit workflows.json can make the server fetch URLs and call Python functions.

It speaks Chat Completions (``/openai/chat/completions``), the Responses API
(``/openai/responses``, with ``previous_response_id``, item references, background
runs and the Conversations API under ``/openai/conversations``) and MCP (``/mcp``: the
handshake era and 2026-07-28, whose sealed requestState lets any instance given the
same ``--mcp-state-secret`` go on with a gathering), each a thin block over one turn;
``GET /`` is a page for people and ``GET /metrics`` gives Prometheus counters.
Conversations live in memory, in a folder of JSON files (the default), or in Redis
or Valkey (``--store redis://host:6379/0``) for several instances on several
machines; another store is a ``Store`` subclass (its docstring states the locking
rule). Text the internal LLM writes for a person (questions, client tasks) is
checked before it is shown, with a templated fallback, written in the user's
language where the workflow gives its questions in it (``translations``).

Limits: token counts in ``usage`` are estimates (about four characters a
token); one choice per request (``n`` must be 1); the JSON store keeps one
file per conversation in a directory, fine for thousands of chats on one
machine; without an LLM the reader knows English, French, German, Spanish,
Italian and Portuguese (one table each, in "Reading: the language tables");
the thinking block, and the reason a value is refused, are English.
"""

from __future__ import annotations   # a type named before its section, as an argument, is not read at import

__version__ = "0.1.0"
__all__ = [
    "make_app", "main", "create_server", "ServerLimits", "app", "AppFromEnvironment",
    "load_workflows", "Workflow", "Node", "QueryInput", "Link", "QueryRef", "FixedRef", "FunctionFinder",
    "check_value", "NodeType", "NodeTypes", "NodeContext", "TextStream", "NODE_TYPES",
    "Language", "LANGUAGES", "check_language", "Service", "TurnRequest", "Turn", "AnsweredTurn", "StreamedTurn",
    "run_workflow", "RunEvent",
    "LLMSettings", "LLMClient",
    "Conversation", "ConversationIds", "MemoryStore", "JsonFileStore", "STORE_TYPES", "open_store",
    "Metrics", "LogLineFormatter", "log_line_handler", "Store", "RedisStore", "CozyError", "WorkflowFileError", "ConfigError", "StoreUnavailable",
    "NodeFailed", "UpstreamError", "RequestError",
    "UnauthorizedError", "NotFoundError", "ModelNotFoundError", "MethodNotAllowedError",
    "BodyTooLargeError", "UnsupportedMediaTypeError", "ForbiddenOriginError", "HeadersTooLargeError", "UriTooLongError",
    "RequestTimeoutError", "ServerBusyError", "LLMError", "LLMTimeout", "McpError",
    "mcp_state_key", "seal_request_state", "open_request_state",
]

import abc
import argparse
import base64
import contextlib
import dataclasses
import errno
import hashlib
import hmac
import html
import importlib.util
import io
import itertools
import ipaddress
import json
import logging
import math
import os
import pickle
import queue
import random
import re
import secrets
import select
import signal
import socket
import string
import sys
import threading
import time
import traceback
import unicodedata
import weakref
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from functools import cached_property, lru_cache, partial
from types import MappingProxyType
from typing import (AbstractSet, Any, Callable, Dict, Iterable, Iterator, List, Mapping, NamedTuple, NoReturn,
                    Optional, Sequence, TextIO, Tuple, Union)
from urllib.parse import quote, quote_plus, urlsplit
from wsgiref.simple_server import ServerHandler, WSGIRequestHandler, WSGIServer

try:   # a missing package is one line from main() (pip install -r requirements.txt), not a traceback
    import bottle
    import requests
    MISSING_PACKAGE: Optional[ImportError] = None
except ImportError as _missing:
    MISSING_PACKAGE = _missing

try:
    import fcntl   # file locks, so several worker processes can share the JSON store
except ImportError:  # Windows: the JSON store is safe within one process only
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("cozyopenai")

MAX_BODY_BYTES = 8 * 1024 * 1024          # chat histories are long; Bottle's default is 100 KB
CONVERSATION_ID_BYTES = 24                # 192 random bits, 32 URL-safe characters
SNAPSHOT_ID_BYTES = 6                      # 48 random bits, 12 hex digits: one of a conversation's snapshots
CONVERSATION_ID_PATTERN = re.compile(r"\A[A-Za-z0-9_-]{32}\Z")
ID_BLOCK_INFO = "cozyui-conversation-identifier"
ID_BLOCK_PATTERN = re.compile(r"```" + ID_BLOCK_INFO + r"[ \t]*\r?\n\s*([A-Za-z0-9_-]+)\s*\r?\n?```")
THINKING_PATTERN = re.compile(r"<thinking>.*?(?:</thinking>|\Z)", re.S)
MODEL_OWNER = "cozyui"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_WORKFLOWS_PATH = "workflows.json"
DEFAULT_STORE = "conversations"           # a directory: the JSON store, so restarts lose nothing
LLM_TIMEOUT_SECONDS = 30.0
HANGUP_CHECK_SECONDS = 0.05               # how often a running turn looks whether its client left
IDLE_THREAD_SECONDS = 60.0                # a server thread with no connection to answer ends after this
LISTEN_BACKLOG = 1024                     # connections the kernel holds while the server accepts
IDLE_THREADS_KEPT = 32                    # server threads that wait for a next connection; more end
REQUEST_LINE_SECONDS = 10.0               # built-in server: a new connection's request line must arrive in this
HEADER_SECONDS = 10.0                     # ... then its header fields
BODY_PAUSE_SECONDS = 30.0                 # ... then its body may pause this long at most (else 408)
MAX_CONNECTIONS = 1000                    # ... and this many connections at once (past them, 503)
REFUSAL_READ_SECONDS = 0.2                # a refused connection's request is read this long before the 503
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"   # what LogLineFormatter writes
SERVER_THREADS = 256                      # for --server gunicorn/waitress/cheroot: each open stream holds one
HTTP_NODE_TIMEOUT_SECONDS = 30.0
LLM_CHECK_SECONDS = 3.0                   # the start-up look at the LLM's /models
LLM_NODE_MAX_TOKENS = 1024                # an `llm` node's answer, unless its `max_tokens` says otherwise
# The server's own calls are short; a cap keeps a small model that loops from writing until
# its context is full (gemma3-270m did, for minutes, on an uncapped extraction call).
EXTRACTION_MAX_TOKENS = 512               # the JSON of every input's value, and the question in single-call mode
QUESTION_MAX_TOKENS = 160                 # one short question
CLIENT_TASK_MAX_TOKENS = 200              # a chat title, tags or follow-up suggestions
LLM_NODE_TIMEOUT_SECONDS = 120.0          # an `llm` node's whole stream, unless its `timeout_seconds` does
MEMORY_STORE_MAX_CONVERSATIONS = 10_000
TEMPORARY_FILE_SECONDS = 60.0             # an older temporary file in the JSON store is a killed save's leftover
REDIS_LOCK_SECONDS = 30.0                 # a turn's lock in Redis lives this long unless its holder renews it
REDIS_LOCK_POLL_SECONDS = 0.02            # how often a turn waiting for that lock tries again
REDIS_TIMEOUT_SECONDS = 5.0               # to connect to Redis, and for each command
REDIS_LOCK_WAIT_SECONDS = 600.0           # a turn waits this long for the one before it (its holder renews it)
KEEPALIVE_SECONDS = 10.0                  # an SSE comment this often while a stream is silent
EXPIRE_EVERY_SECONDS = 3600.0             # how often the store is swept for old conversations
SNAPSHOTS_KEPT = 40                       # turns of state a conversation keeps, for edits and older branches
RESPONSES_KEPT = 100                      # stored responses (Responses API) a conversation keeps, newest
ANSWERED_KEPT = 8                         # answers a conversation keeps by request, to give again to a twin
RECORD_VERSION = 2                        # conversation records: 1 held one mutable state, 2 holds snapshots
LEGACY_SNAPSHOT = "version-1"             # the key of the one snapshot a version-1 record becomes
MAX_ASKS_PER_INPUT = 3                    # then say so and offer to start over, instead of asking forever
TRANSPORT_LOGGERS = ("httpx", "httpx2", "httpcore")   # the openai client's HTTP libraries, by release
MAX_DIRECT_REPLY_WORDS = 4                # a longer reply to "where to?" is a sentence, not a destination
READ_MAX_CHARS = 16000                    # of a message, read: its first and last halves (a 6 MB one held a thread for a minute)
EMOJI_CATEGORY = "So"                     # Unicode's "other symbol": emoji, which end a part of a sentence
MAX_NUMBER_VALUE = 10 ** 15               # a number beyond this is a slip, never a budget, count or year
CONTEXT_TURNS = 6                         # earlier messages shown to the extraction call
CHARS_PER_TOKEN = 4                       # for the estimated `usage` figures
REDACTED = "[redacted]"
CONNECTION_ENVIRON_KEY = "cozyopenai.connection"   # the client's socket, to notice a hang-up
TRACE_ENVIRON_KEY = "cozyopenai.trace"             # model and short conversation id, for the log line
ENDING_ENVIRON_KEY = "cozyopenai.ending"           # how a stream ends if the server cuts it short (StreamEnding)
REQUEST_LINE_ENVIRON_KEY = "cozyopenai.request_line"   # (method, path), as the edge guard read them
SHUTDOWN_GRACE_SECONDS = 10.0                       # on SIGTERM, running turns have this long to finish
SHUTDOWN_MESSAGE = "The server is shutting down; this reply was cut short. Send it again in a moment."
# The C encoder behind json.dumps(value, ensure_ascii=False), made once: JSONEncoder.encode
# makes a new one on every call. Without a circular check, which our values, trees of JSON
# data, never need (a stale mark left by a failed call would even refuse a later value).
_JSON_CHUNKS = json.encoder.c_make_encoder and json.encoder.c_make_encoder(
    None, json.JSONEncoder().default, json.encoder.encode_basestring, None, ": ", ", ", False, False, True)


def json_text(value: Any) -> str:
    """json.dumps(value, ensure_ascii=False): the text every reply is written in."""
    if _JSON_CHUNKS is None:   # a Python without the json module's C part
        return json.dumps(value, ensure_ascii=False)
    return "".join(_JSON_CHUNKS(value, 0))


# A string as json_text writes it, without the encoder's set-up (a call per streamed piece).
json_string = json.encoder.encode_basestring

# The scanner of json.loads' decoder, made once, and the white space it skips around a document.
_JSON_SCAN, _JSON_SPACE = json.JSONDecoder().scan_once, json.decoder.WHITESPACE.match


def json_document(text: str) -> Any:
    """json.loads(text) for a str, as JSONDecoder.decode reads it, without the three Python
    calls (loads, decode, raw_decode) around the scanner: ValueError when it is no JSON."""
    # Most documents have no white space around them: the scanner tries the first character
    # at once (white space there is no value, StopIteration), and the white space is matched
    # only where there is some.
    try:
        value, end = _JSON_SCAN(text, 0)
    except StopIteration:
        try:
            value, end = _JSON_SCAN(text, _JSON_SPACE(text, 0).end())
        except StopIteration:   # no value where one starts
            raise ValueError("Expecting value") from None
    if end != len(text) and _JSON_SPACE(text, end).end() != len(text):
        raise ValueError("Extra data")
    return value


####################################################################################
# Errors
####################################################################################

class CozyError(Exception):
    """Base of every error here; knows its HTTP status and its OpenAI error type."""
    status = 500
    error_type = "server_error"
    code: Optional[str] = None

    def __init__(self, message: str, *, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def to_openai(self) -> dict:
        return {"error": {"message": self.message, "type": self.error_type,
                          "param": self.param, "code": self.code}}


class WorkflowFileError(CozyError): """The workflows cannot be served; raised at start-up."""
class ConfigError(CozyError): """A setting the server cannot start with (a store it cannot write, ...)."""
class StoreUnavailable(CozyError): status = 503   # the conversation store (Redis) cannot be reached now
class NodeFailed(CozyError): """A node failed while a workflow ran; ends the run, not the conversation."""
class UpstreamError(CozyError): status, error_type = 502, "upstream_error"
class RequestError(CozyError): status, error_type = 400, "invalid_request_error"
class UnauthorizedError(RequestError): status, code = 401, "invalid_api_key"
class NotFoundError(RequestError): status, code = 404, "not_found"
class ModelNotFoundError(NotFoundError): code = "model_not_found"
class MethodNotAllowedError(RequestError): status, code = 405, "method_not_allowed"
class BodyTooLargeError(RequestError): status, code = 413, "request_too_large"
class UnsupportedMediaTypeError(RequestError): status, code = 415, "unsupported_media_type"
class ForbiddenOriginError(RequestError): status, code = 403, "origin_not_allowed"   # another site's page
class RequestTimeoutError(RequestError): status, code = 408, "request_timeout"   # a body that stopped arriving
class HeadersTooLargeError(RequestError): status, code = 431, "request_header_fields_too_large"
class UriTooLongError(RequestError): status, code = 414, "uri_too_long"
class ServerBusyError(CozyError): status, code = 503, "server_busy"   # past the connection cap, or shutting down

# Bottle raises its own HTTPError before our handlers run (no route, wrong method);
# these turn its status into ours so every error leaves as an OpenAI error object.
HTTP_STATUS_ERRORS = {400: RequestError, 401: UnauthorizedError, 404: NotFoundError,
                      405: MethodNotAllowedError, 408: RequestTimeoutError, 413: BodyTooLargeError,
                      414: UriTooLongError, 431: HeadersTooLargeError, 503: ServerBusyError}


class LLMError(UpstreamError):
    """The internal LLM failed. ``reason`` is short and safe to show ("HTTP 500", "timed out after
    120 s"); ``upstream_status`` and ``names_format`` (the error body names response_format,
    json_schema or json_object) tell a refused structured-output mode from an outage."""

    def __init__(self, reason: str, *, upstream_status: Optional[int] = None, names_format: bool = False):
        super().__init__(f"the language model did not answer usably ({reason})")
        self.reason, self.upstream_status, self.names_format = reason, upstream_status, names_format
        self.status = 400 if upstream_status == 400 else 502


class LLMTimeout(LLMError):
    """The whole answer did not arrive within its time limit."""


####################################################################################
# Workflows: the file format and its checks
####################################################################################

# Text types hold the user's words; "place" and "date" tell the reader what to look for
# ("a trip to Lisbon", "from 10 to 17 October"), "email" and "url" are checked. Number types
# hold numbers; "money" takes amounts with a currency ("1 200 €", "$5000").
STRING_TYPES = ("string", "place", "date", "email", "url")
NUMERIC_TYPES = ("number", "integer", "money")
VALUE_TYPES = STRING_TYPES + NUMERIC_TYPES + ("boolean", "choice")
WORKFLOW_NAME_PATTERN = re.compile(r"\A[a-z0-9][a-z0-9._-]{0,63}\Z")
NODE_ID_PATTERN = re.compile(r"\A[A-Za-z_][A-Za-z0-9_-]{0,63}\Z")
INPUT_NAME_PATTERN = re.compile(r"\A[A-Za-z_][A-Za-z0-9_]{0,63}\Z")
FORMAT_PATTERNS = {   # the text types whose values have a shape of their own
    "email": re.compile(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)+\b"),
    "url": re.compile(r"\bhttps?://[^\s<>\"']+"),
}
# Literal node inputs with these names are treated like fixed inputs: never shown.
SECRET_NAME_PATTERN = re.compile(r"key|token|secret|passw|auth|credential|headers", re.I)


@dataclass(frozen=True)
class Link:
    """A node input fed by another node's output (or a path inside it: ``node.key.0``)."""
    node: str
    path: Tuple[str, ...] = ()


@dataclass(frozen=True)
class QueryRef:
    """A node input the chat user provides: a named query input."""
    name: str


@dataclass(frozen=True)
class FixedRef:
    """A node input set by the workflow's author in ``fixed_inputs``."""
    name: str


class Translation(NamedTuple):
    """An input's label, question and choices in another language; "" where none is given."""
    label: str
    question: str
    choices: Mapping[str, str]


NO_TRANSLATION = Translation("", "", MappingProxyType({}))


@dataclass(frozen=True)
class QueryInput:
    """A value gathered from the chat user."""
    name: str
    description: str
    type: str = "string"
    choices: Tuple[str, ...] = ()
    optional: bool = False
    default: Any = None
    question: str = ""
    synonyms: Tuple[Tuple[str, Any], ...] = ()   # (word a user may say, the value it means)
    minimum: Optional[float] = None
    maximum: Optional[float] = None
    cues: Tuple[str, ...] = ()     # words after which a user names a text value ("trip to" Paris)
    # In other languages, by code ("fr": Translation("budget", "Quel est ...?", {})).
    translations: Mapping[str, "Translation"] = field(default_factory=dict, compare=False)   # (unhashable)
    # What the reader works out from the definition (its kind, ...), kept so it is worked out once.
    derived: Dict[str, Any] = field(default_factory=dict, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        # Its label ("trip_budget" -> "trip budget"), read in every thinking line and question: a
        # plain attribute, set once, is read quicker than a cached_property (a descriptor, which
        # the interpreter's attribute caches pass over).
        object.__setattr__(self, "label", self.name.replace("_", " "))

    def label_in(self, code: str) -> str:
        """The label in the language of ``code``, or "" when the workflow gives none."""
        return self.label if code == "en" else self.translations.get(code, NO_TRANSLATION).label

    def question_in(self, code: str) -> str:
        """The question in the language of ``code``, or "" when the workflow gives none."""
        return self.question if code == "en" else self.translations.get(code, NO_TRANSLATION).question

    def choice_in(self, code: str, choice: str) -> str:
        """A choice as the language of ``code`` names it, or "" when the workflow gives no name."""
        return choice if code == "en" else self.translations.get(code, NO_TRANSLATION).choices.get(choice, "")


@dataclass(frozen=True)
class Node:
    id: str
    type: str
    description: str
    inputs: Mapping[str, Any]
    timeout_seconds: Optional[float] = None    # the run fails if the node takes longer

    def dependencies(self) -> set:
        return set(self._links)   # a new set: the runner crosses them off as their nodes finish

    @cached_property
    def _links(self) -> AbstractSet[str]:   # the nodes it takes inputs from: its inputs never change, and every run asks
        return frozenset(value.node for value in self.inputs.values() if isinstance(value, Link))

    def __post_init__(self) -> None:
        # Set once, as a plain attribute (read quicker than a cached_property): every run reads it.
        object.__setattr__(self, "filling", self._filling())

    def _filling(self) -> Tuple[Dict[str, Any], Tuple[Tuple[str, Any, Any], ...]]:
        """``filling``: its inputs as a plain dict to copy (in the file's order: a plain dict's
        copy costs half a proxy's), and those whose values are found when it runs, each as (its
        name, where, key): QueryRef (the query input named key), Link (the whole output of the
        node key), or None (key is the reference itself: a path into an output, a fixed input).
        The other inputs are used as written."""
        references = []
        for name, value in self.inputs.items():
            kind = type(value)
            if kind is QueryRef:
                references.append((name, QueryRef, value.name))
            elif kind is Link and not value.path:
                references.append((name, Link, value.node))
            elif isinstance(value, (Link, QueryRef, FixedRef)):
                references.append((name, None, value))
        return dict(self.inputs), tuple(references)


class FunctionFinder:
    """Finds a `python` node's ``module:function``. A module file beside the workflows file
    (``mytools.py`` next to ``workflows.json``) is loaded by its path, once, and kept here,
    never put on the host's ``sys.path`` or in ``sys.modules``; any other name is imported."""

    def __init__(self, folder: str):
        self.folder = folder
        self._modules: Dict[str, Any] = {}
        self._guard = threading.Lock()

    def __call__(self, spec: str) -> Callable[..., Any]:
        module_name, _, function_name = str(spec).partition(":")
        if not module_name or not function_name:
            raise ValueError(f"'function' must look like 'module:function', got {spec!r}")
        function = self._module(module_name)
        for part in function_name.split("."):
            function = getattr(function, part)
        if not callable(function):
            raise TypeError(f"{spec!r} is not callable")
        return function

    def _module(self, name: str) -> Any:
        path = os.path.join(self.folder, name + ".py") if self.folder and "." not in name else ""
        if not path or not os.path.isfile(path):
            return importlib.import_module(name)
        with self._guard:
            if name not in self._modules:
                spec = importlib.util.spec_from_file_location(name, path)
                module = importlib.util.module_from_spec(spec)   # type: ignore[arg-type]
                spec.loader.exec_module(module)                  # type: ignore[union-attr]
                self._modules[name] = module
            return self._modules[name]


@dataclass(frozen=True)
class Workflow:
    name: str
    description: str
    nodes: Tuple[Node, ...]                    # in an order where every node follows its inputs
    query_inputs: Mapping[str, QueryInput]
    fixed_inputs: Mapping[str, Any]
    output_node: str
    created: int
    functions: "FunctionFinder" = field(default_factory=lambda: FunctionFinder(""), compare=False, repr=False)
    # What later sections work out from the workflow (the reader's taken words, ...), once.
    derived: Dict[str, Any] = field(default_factory=dict, init=False, compare=False, repr=False)

    def node(self, node_id: str) -> Node:
        return self._nodes_by_id[node_id]

    @cached_property
    def _nodes_by_id(self) -> Dict[str, Node]:   # looked up several times a turn
        return {node.id: node for node in reversed(self.nodes)}   # the first of an id, as a search finds it

    def nodes_fed_by(self, query_name: str) -> List[Node]:
        return [node for node in self.nodes if QueryRef(query_name) in node.inputs.values()]

    def missing(self, values: Mapping[str, Any]) -> List["QueryInput"]:
        """The required inputs that ``values`` does not hold yet, in the file's order."""
        if not values:   # a conversation's start: all of them
            return list(self._required)
        if values.keys() >= self._required_names:   # all given, as once a message gave them: no list to sift
            return []
        return [query for query in self._required if query.name not in values]

    @cached_property   # worked out once: every turn asks what is missing
    def _required(self) -> Tuple["QueryInput", ...]:
        return tuple(query for query in self.query_inputs.values() if not query.optional)

    @cached_property
    def _required_names(self) -> AbstractSet[str]:
        return frozenset(query.name for query in self._required)

    def with_defaults(self, values: Mapping[str, Any]) -> Dict[str, Any]:
        """``values`` with each input they leave out set to its default (optional inputs have one)."""
        if values.keys() >= self._query_names:   # every input given (no optional ones, or all set): a copy
            return dict(values)
        return {**values, **{name: query.default for name, query in self.query_inputs.items() if name not in values}}

    @cached_property
    def _query_names(self) -> AbstractSet[str]:
        return frozenset(self.query_inputs)

    @cached_property   # worked out once: every run asks
    def has_optional_inputs(self) -> bool:
        """Whether some input may be left out (and then takes its default)."""
        return len(self._required) < len(self.query_inputs)

    def answer_source(self) -> Optional[str]:
        """The node whose whole output is the answer; its tokens may stream straight out."""
        return self._answer_source

    @cached_property
    def _answer_source(self) -> Optional[str]:   # worked out once: every run asks
        text = self.node(self.output_node).inputs.get("text")
        return text.node if isinstance(text, Link) and not text.path else None

    @cached_property   # worked out once: every run asks
    def chain(self) -> Optional[Tuple[Node, ...]]:
        """The nodes in the order they run when only one at a time can, as in most workflows:
        ``nodes`` (each after its inputs) when each takes an input from the one before it; None
        when some could run side by side."""
        if all(before.id in node.dependencies() for before, node in zip(self.nodes, self.nodes[1:])):
            return self.nodes
        return None

    @cached_property
    def redact(self) -> "Redactor":
        """Replaces this workflow's secrets in a text that is about to leave the server."""
        return Redactor(self.secret_values())

    @cached_property   # every turn asks, twice: read with no call to the Redactor's __bool__
    def has_secrets(self) -> bool:
        """Whether ``redact`` changes any text (most workflows have no secrets: it never does)."""
        return bool(self.redact)

    def secret_values(self) -> Tuple[str, ...]:
        """Strings redacted from everything that leaves the server: fixed inputs and node inputs
        with key-like names (whether literal or fed by a fixed input), and fixed inputs whose
        value looks like a credential."""
        found = [value for name, value in self.fixed_inputs.items()
                 if SECRET_NAME_PATTERN.search(name) or _looks_like_credential(value)]
        for node in self.nodes:
            for name, value in node.inputs.items():
                if SECRET_NAME_PATTERN.search(name):
                    # A fixed input named "api" but fed to a node input "token" is a secret too.
                    found.append(self.fixed_inputs[value.name] if isinstance(value, FixedRef) else value)
        return tuple(sorted(set(_strings_in(found)), key=len, reverse=True))


def check_value(query: QueryInput, value: Any) -> Any:
    """``value``, written as the input's own type (a default in the workflows file, say),
    checked against its definition: type, bounds, choices and format. ValueError says why
    not, in words for the user. The reader turns what people write into such values."""
    label = query.label
    if query.type == "boolean":
        if not isinstance(value, bool):
            raise ValueError(f"I need true or false for the {label}, not {value!r}")
        return value
    if query.type in NUMERIC_TYPES:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"I need a number for the {label}, not {value!r}")
        check_bounds(query, value)
        if query.type == "integer" and value != int(value):
            raise ValueError(f"I need a whole number for the {label}, not {value!r}")
        return int(value) if value == int(value) else value
    if query.type == "choice":
        if value not in query.choices:
            raise ValueError(f"the {label} is one of {', '.join(query.choices)}, not {value!r}")
        return value
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"I need some text for the {label}")
    if query.type in FORMAT_PATTERNS and not FORMAT_PATTERNS[query.type].fullmatch(value.strip()):
        raise ValueError(f"I need {'an email address' if query.type == 'email' else 'a web address'} "
                         f"for the {label}, not {value!r}")
    return value.strip()


def check_bounds(query: QueryInput, number: float) -> None:
    """A number within the input's ``minimum`` and ``maximum``; ValueError names the bound."""
    if query.minimum is not None and number < query.minimum:
        raise ValueError(f"the {query.label} must be at least {query.minimum:g}, not {number:g}")
    if query.maximum is not None and number > query.maximum:
        raise ValueError(f"the {query.label} must be at most {query.maximum:g}, not {number:g}")


def _looks_like_credential(value: Any) -> bool:
    return (isinstance(value, str) and len(value) >= 16 and not re.search(r"\s", value)
            and bool(re.search(r"\d", value)) and bool(re.search(r"[A-Za-z]", value)))


def _strings_in(values: Iterable[Any]) -> Iterator[str]:
    for value in values:
        if isinstance(value, str) and len(value) >= 4:
            yield value
        elif isinstance(value, dict):
            yield from _strings_in(value.values())
        elif isinstance(value, (list, tuple)):
            yield from _strings_in(value)


def _parse_workflow(item: Any, label: str, index: int, node_types: Mapping[str, "NodeType"],
                    created: int, functions: FunctionFinder) -> Workflow:
    where = f"{label}: workflow #{index + 1}"
    if not isinstance(item, dict):
        raise WorkflowFileError(f"{where}: expected an object")
    name = item.get("name")
    if not isinstance(name, str) or not WORKFLOW_NAME_PATTERN.match(name):
        raise WorkflowFileError(f"{where}: 'name' must be a slug of lowercase letters, digits, '-', '_' "
                                f"or '.' (it becomes the model id), got {name!r}")
    where = f"{label}: workflow {name!r}"
    description = item.get("description")
    if not isinstance(description, str) or not description.strip():
        raise WorkflowFileError(f"{where}: needs a 'description' (it guides the extraction of inputs)")
    query_inputs = _parse_query_inputs(item.get("query_inputs", {}), where)
    fixed_inputs = item.get("fixed_inputs", {})
    if not isinstance(fixed_inputs, dict):
        raise WorkflowFileError(f"{where}: 'fixed_inputs' must be an object of name: value")
    raw_nodes = item.get("nodes")
    if not isinstance(raw_nodes, list) or not raw_nodes:
        raise WorkflowFileError(f"{where}: needs a non-empty 'nodes' list")
    nodes: Dict[str, Node] = {}
    for index, raw in enumerate(raw_nodes):
        node = _parse_node(raw, where, index, node_types, query_inputs, fixed_inputs, functions)
        if node.id in nodes:
            raise WorkflowFileError(f"{where}, node {node.id!r}: the id is used twice")
        nodes[node.id] = node
    for node in nodes.values():
        for input_name, value in node.inputs.items():
            if isinstance(value, Link) and value.node not in nodes:
                raise WorkflowFileError(f"{where}, node {node.id!r}: input {input_name!r} links to "
                                        f"node {value.node!r}, which does not exist")
    outputs = [node.id for node in nodes.values() if node.type == "output"]
    if len(outputs) != 1:
        raise WorkflowFileError(f"{where}: needs exactly one node of type 'output' (its text is the "
                                f"answer), found {len(outputs)}")
    for query in query_inputs.values():
        if not any(QueryRef(query.name) in node.inputs.values() for node in nodes.values()):
            raise WorkflowFileError(f"{where}: query input {query.name!r} feeds no node; "
                                    f'link it with {{"query": "{query.name}"}} or remove it')
    created = item.get("created", created)
    if isinstance(created, bool) or not isinstance(created, int) or created < 0:
        raise WorkflowFileError(f"{where}: 'created' is a Unix time in whole seconds, got {created!r}")
    return Workflow(name=name, description=description.strip(), nodes=_in_dependency_order(nodes, where),
                    query_inputs=MappingProxyType(query_inputs), fixed_inputs=MappingProxyType(dict(fixed_inputs)),
                    output_node=outputs[0], created=created, functions=functions)


def _parse_query_inputs(raw: Any, where: str) -> Dict[str, QueryInput]:
    if not isinstance(raw, dict):
        raise WorkflowFileError(f"{where}: 'query_inputs' must be an object of name: definition")
    parsed = {}
    for name, spec in raw.items():
        at = f"{where}, query input {name!r}"
        if not INPUT_NAME_PATTERN.match(name):
            raise WorkflowFileError(f"{at}: names are letters, digits and '_'")
        if not isinstance(spec, dict):
            raise WorkflowFileError(f"{at}: expected an object with a 'description' and a 'type'")
        description = spec.get("description")
        if not isinstance(description, str) or not description.strip():
            raise WorkflowFileError(f"{at}: needs a 'description' (the user is asked from it)")
        value_type = spec.get("type", "string")
        if value_type not in VALUE_TYPES:
            raise WorkflowFileError(f"{at}: unknown type {value_type!r}; use one of {', '.join(VALUE_TYPES)}")
        choices = spec.get("choices", [])
        if value_type == "choice" and (not isinstance(choices, list) or not choices
                                       or not all(isinstance(c, str) and c.strip() for c in choices)):
            raise WorkflowFileError(f"{at}: type 'choice' needs a non-empty 'choices' list of strings")
        optional = spec.get("optional", False)
        if not isinstance(optional, bool):
            raise WorkflowFileError(f"{at}: 'optional' must be true or false")
        query = QueryInput(name=name, description=description.strip(), type=value_type,
                           choices=tuple(choices), optional=optional, question=str(spec.get("question", "")),
                           synonyms=_parse_synonyms(spec.get("synonyms", {}), value_type, choices, at),
                           minimum=_parse_bound(spec, "minimum", at, 0 if value_type == "money" else None),
                           maximum=_parse_bound(spec, "maximum", at),
                           cues=_parse_cues(spec.get("cues", []), value_type, at),
                           translations=_parse_translations(spec.get("translations", {}), choices, at))
        named = [(text, choice) for translation in query.translations.values() for choice, text in
                 translation.choices.items() if (text, choice) not in query.synonyms]
        if named:   # a choice as the questions name it is read as it: "rythme tranquille"
            query = dataclasses.replace(query, synonyms=query.synonyms + tuple(dict.fromkeys(named)))
        if query.minimum is not None and query.maximum is not None and query.minimum > query.maximum:
            raise WorkflowFileError(f"{at}: 'minimum' ({query.minimum:g}) is above 'maximum' ({query.maximum:g}); "
                                    "no value could be accepted")
        if "default" in spec:
            try:
                default = check_value(query, spec["default"])
            except ValueError as exc:
                raise WorkflowFileError(f"{at}: bad default: {exc}") from None
            query = dataclasses.replace(query, default=default)
        if optional and query.default is None:
            raise WorkflowFileError(f"{at}: an optional input needs a 'default'")
        if not optional and "default" in spec:
            # A default on a required input would never be used: say so rather than ignore it.
            raise WorkflowFileError(f"{at}: a 'default' needs \"optional\": true (required inputs are asked for)")
        parsed[name] = query
    return parsed


def _parse_cues(raw: Any, value_type: str, at: str) -> Tuple[str, ...]:
    if not isinstance(raw, list) or not all(isinstance(cue, str) and cue.strip() for cue in raw):
        raise WorkflowFileError(f"{at}: 'cues' must be a list of words, like [\"trip to\", \"visit\"]")
    if raw and value_type not in ("string", "place"):
        raise WorkflowFileError(f"{at}: 'cues' are for inputs of type string or place")
    return tuple(cue.strip() for cue in raw)


def _parse_translations(raw: Any, choices: Sequence[str], at: str) -> Mapping[str, Translation]:
    """The label, the question and the choices in other languages: {"fr": {"label": ...,
    "question": ..., "choices": {"relaxed": "tranquille"}}}. A language the server has no
    table for is never used; the label is also read in a ``label: value`` line, so it must
    hold a word, and a choice's name is read as the choice."""
    if not isinstance(raw, dict):
        raise WorkflowFileError(f"{at}: 'translations' must be an object of language code: "
                                '{"label": ..., "question": ...}')
    parsed = {}
    for code, spec in raw.items():
        if not isinstance(code, str) or not re.fullmatch(r"[a-z]{2}", code) or code == "en":
            raise WorkflowFileError(f"{at}: 'translations' are keyed by a two-letter language code other than "
                                    f"'en' (the input's own label and question), not {code!r}")
        texts = {key: text for key, text in spec.items() if key != "choices"} if isinstance(spec, dict) else None
        if texts is None or not set(texts) <= {"label", "question"} or not all(
                isinstance(text, str) and text.strip() for text in texts.values()):
            raise WorkflowFileError(f"{at}, translation {code!r}: an object with a 'label' and a 'question', "
                                    "each a non-empty text")
        if "label" in spec and not re.search(r"[^\W\d_]", spec["label"]):
            raise WorkflowFileError(f"{at}, translation {code!r}: the label needs a word")
        named = spec.get("choices", {})
        if not isinstance(named, dict) or not set(named) <= set(choices) or not all(
                isinstance(text, str) and text.strip() for text in named.values()):
            raise WorkflowFileError(f"{at}, translation {code!r}: 'choices' names each of the input's choices "
                                    f"({', '.join(choices) or 'it has none'}) in that language")
        parsed[code] = Translation(spec.get("label", "").strip(), spec.get("question", "").strip(),
                                   MappingProxyType({choice: text.strip() for choice, text in named.items()}))
    return MappingProxyType(parsed)


def _parse_bound(spec: Mapping[str, Any], key: str, at: str, default: Optional[float] = None) -> Optional[float]:
    """A bound of a number input; money has a minimum of 0 unless the file gives one."""
    bound = spec.get(key, default)
    if bound is not None and (spec.get("type") not in NUMERIC_TYPES or isinstance(bound, bool)
                              or not isinstance(bound, (int, float))):
        raise WorkflowFileError(f"{at}: {key!r} is a number, for inputs of type number, integer or money")
    if bound is not None and not math.isfinite(bound):
        raise WorkflowFileError(f"{at}: {key!r} must be a finite number, not {bound}")
    return bound


def _parse_synonyms(raw: Any, value_type: str, choices: List[str], at: str) -> Tuple[Tuple[str, Any], ...]:
    """Words for a choice ({"relaxed": ["calm"]}), a number ({"3": ["March", "mars"]}), or a
    yes or no ({"true": ["kids", "enfants"]}: "no kids" is then a no)."""
    if not isinstance(raw, dict) or not all(isinstance(words, list) for words in raw.values()):
        raise WorkflowFileError(f"{at}: 'synonyms' must be an object of value: [words]")
    if value_type in NUMERIC_TYPES:
        unknown = [value for value in raw if not re.fullmatch(r"-?\d+(\.\d+)?", value)]
        if unknown:
            raise WorkflowFileError(f"{at}: 'synonyms' names {unknown[0]!r}, which is not a number")
    elif value_type == "boolean":
        unknown = [value for value in raw if value not in ("true", "false")]
        if unknown:
            raise WorkflowFileError(f"{at}: 'synonyms' of a yes/no input are for \"true\" or \"false\", "
                                    f"not {unknown[0]!r}")
        return tuple((str(word), value == "true") for value, words in raw.items() for word in words)
    elif raw and value_type != "choice":
        raise WorkflowFileError(f"{at}: 'synonyms' are for inputs of type choice, boolean or a number type")
    else:
        unknown = [choice for choice in raw if choice not in choices]
        if unknown:
            raise WorkflowFileError(f"{at}: 'synonyms' names {unknown[0]!r}, which is not one of the choices")
    return tuple((str(word), value) for value, words in raw.items() for word in words)


def _parse_node(raw: Any, workflow_where: str, index: int, node_types: Mapping[str, "NodeType"],
                query_inputs: Mapping[str, QueryInput], fixed_inputs: Mapping[str, Any],
                functions: FunctionFinder) -> Node:
    where = f"{workflow_where}, node #{index + 1}"
    if not isinstance(raw, dict):
        raise WorkflowFileError(f"{where}: expected an object with 'id', 'type' and 'inputs'")
    node_id = raw.get("id")
    if not isinstance(node_id, str) or not NODE_ID_PATTERN.match(node_id):
        raise WorkflowFileError(f"{where}: 'id' must be letters, digits, '_' or '-', got {node_id!r}")
    where = f"{workflow_where}, node {node_id!r}"
    node_type = raw.get("type")
    if node_type not in node_types:
        raise WorkflowFileError(f"{where}: unknown node type {node_type!r} "
                                f"(known: {', '.join(sorted(node_types))})")
    raw_inputs = raw.get("inputs", {})
    if not isinstance(raw_inputs, dict):
        raise WorkflowFileError(f"{where}: 'inputs' must be an object")
    inputs = {name: _parse_input_value(value, f"{where}, input {name!r}", query_inputs, fixed_inputs)
              for name, value in raw_inputs.items()}
    spec = node_types[node_type]
    for required in spec.required:
        if required not in inputs:
            raise WorkflowFileError(f"{where}: a {node_type!r} node needs the input {required!r}")
    for name in spec.author_only:
        # Security: what a chat user types must never choose a URL or a function.
        if isinstance(inputs.get(name), (QueryRef, Link)):
            raise WorkflowFileError(f"{where}: input {name!r} must be written in the workflow file "
                                    "(a literal or a fixed input), not linked or asked from the user")
    if spec.check:
        try:
            spec.check({name: _literal_value(value, fixed_inputs) for name, value in inputs.items()}, functions)
        except (ValueError, TypeError, ImportError, AttributeError) as exc:
            raise WorkflowFileError(f"{where}: {exc}") from None
    timeout = raw.get("timeout_seconds")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0):
        raise WorkflowFileError(f"{where}: 'timeout_seconds' must be a positive number of seconds")
    return Node(id=node_id, type=node_type, description=str(raw.get("description", "")).strip(),
                inputs=MappingProxyType(inputs), timeout_seconds=timeout)


def _parse_input_value(value: Any, where: str, query_inputs: Mapping[str, QueryInput],
                       fixed_inputs: Mapping[str, Any]) -> Any:
    if value is None:
        raise WorkflowFileError(f"{where}: is neither linked, fixed nor a query input; give a value, "
                                '{"link": "node"}, {"fixed": "name"} or {"query": "name"}')
    if not (isinstance(value, dict) and len(value) == 1 and next(iter(value)) in ("link", "query", "fixed")):
        return value
    source, target = next(iter(value.items()))
    if not isinstance(target, str) or not target:
        raise WorkflowFileError(f"{where}: {source!r} needs a name")
    if source == "query":
        if target not in query_inputs:
            raise WorkflowFileError(f"{where}: query input {target!r} is not defined in 'query_inputs'")
        return QueryRef(target)
    if source == "fixed":
        if target not in fixed_inputs:
            raise WorkflowFileError(f"{where}: fixed input {target!r} is not defined in 'fixed_inputs'")
        return FixedRef(target)
    node, *path = target.split(".")
    return Link(node, tuple(path))


def _literal_value(value: Any, fixed_inputs: Mapping[str, Any]) -> Any:
    """The value known at load time, for a node type's check; None where it comes later."""
    if isinstance(value, FixedRef):
        return fixed_inputs[value.name]
    return None if isinstance(value, (Link, QueryRef)) else value


def _in_dependency_order(nodes: Dict[str, Node], where: str) -> Tuple[Node, ...]:
    """Kahn's algorithm; a cycle is reported with the nodes caught in it."""
    waiting = {node_id: set(node.dependencies()) for node_id, node in nodes.items()}
    ordered: List[Node] = []
    while waiting:
        ready = [node_id for node_id, deps in waiting.items() if not deps]
        if not ready:
            raise WorkflowFileError(f"{where}: the links form a cycle through nodes "
                                    f"{', '.join(sorted(_on_cycles(waiting)))}; "
                                    "a node runs only when all its inputs are ready")
        for node_id in ready:
            del waiting[node_id]
            ordered.append(nodes[node_id])
        for deps in waiting.values():
            deps.difference_update(ready)
    return tuple(ordered)


def _on_cycles(waiting: Dict[str, set]) -> set:
    """The nodes Kahn's algorithm left that sit on a cycle, without those merely downstream of one."""
    left = set(waiting)
    while True:
        downstream_only = {node_id for node_id in left
                           if not any(node_id in waiting[other] for other in left)}
        if not downstream_only:
            return left
        left -= downstream_only


def shown_value(value: Any) -> str:
    """A value as people read it, in replies, thinking lines and templates: yes/no rather than
    True/False, a whole number without ".0"; anything else as it is."""
    kind = type(value)
    if kind is str:   # most values, so first
        return value
    if kind is int:   # (a bool's type is bool)
        return str(value)
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return str(value)


def shown_url(url: str) -> str:
    """A URL as logs and listings may show it: scheme, host, port and path, never a user name,
    a password or a query (an upstream's key is often passed in one)."""
    parts = urlsplit(str(url))
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}" if parts.scheme else "(not a URL)"


class Redactor:
    """Replaces the workflow's secrets in outgoing text: each in its plain form and in the
    forms an upstream may echo it in (encoded_forms), all built once."""

    def __init__(self, secrets_: Sequence[str]):
        forms = {form for secret in secrets_ if secret for form in encoded_forms(secret)}
        self._secrets = tuple(sorted(forms, key=len, reverse=True))   # "abcdef" before "abc"
        self._pattern = re.compile("|".join(map(re.escape, self._secrets))) if self._secrets else None

    def __call__(self, text: str) -> str:
        return self._pattern.sub(REDACTED, text) if self._pattern else text

    def __bool__(self) -> bool:
        return self._pattern is not None

    def stream(self, fields: Iterator[Tuple[str, str]]) -> Iterator[Tuple[str, str]]:
        """Redact (field, text) pieces as they stream. An LLM may echo a secret split over two
        tokens, so the end of a piece that could begin a secret waits for the next piece."""
        current, held = "", ""
        for name, text in fields:
            if name != current and held:   # a secret does not span fields
                yield current, self(held)
                held = ""
            current, text = name, self(held + text)
            cut = len(text) - self._possible_start(text)
            text, held = text[:cut], text[cut:]
            if text:
                yield name, text
        if held:
            yield current, self(held)

    def _possible_start(self, text: str) -> int:
        """The length of the longest end of ``text`` that is the beginning of a secret."""
        return max((size for secret in self._secrets for size in range(min(len(secret) - 1, len(text)), 0, -1)
                    if text.endswith(secret[:size])), default=0)


ENCODED_FORM_MIN_CHARS = 8   # a shorter encoded form would match ordinary text: only the plain form is redacted


def encoded_forms(secret: str) -> List[str]:
    """The secret as it may leave the server: plain; URL-encoded (quote with and without '/'
    kept, quote_plus, escapes in either case); JSON-escaped (ASCII-only or not, '/' as '\\/');
    base64, standard and URL-safe, whole and as it reads inside a longer encoded text (at
    each of the three offsets, so "user:secret" in a Basic header is caught); hex in either
    case. Encoded forms shorter than ENCODED_FORM_MIN_CHARS are left out."""
    data = secret.encode("utf-8")
    forms = [quote(secret, safe=""), quote(secret), quote_plus(secret), quote_plus(secret, safe="/")]
    forms += [re.sub(r"%[0-9A-F]{2}", lambda m: m.group().lower(), form) for form in forms]
    for ascii_only in (True, False):
        escaped = json.dumps(secret, ensure_ascii=ascii_only)[1:-1]
        forms += [escaped, escaped.replace("/", "\\/")]
    for encode in (base64.b64encode, base64.urlsafe_b64encode):
        whole = encode(data).decode("ascii")
        forms += [whole, whole.rstrip("=")]
        for offset in (1, 2):   # at offset 0 the whole form's unpadded start is the same text
            text = encode(bytes(offset) + data + bytes(2)).decode("ascii")
            first, end = -(-8 * offset // 6), (8 * (offset + len(data))) // 6   # characters of the secret's bits only
            forms.append(text[first:end])
        forms.append(encode(data + bytes(2)).decode("ascii")[:(8 * len(data)) // 6])
    forms += [data.hex(), data.hex().upper()]
    return [secret] + [form for form in dict.fromkeys(forms) if form != secret and len(form) >= ENCODED_FORM_MIN_CHARS]


####################################################################################
# Node types, and loading a workflows file with them
####################################################################################

def load_workflows(source: Union[str, os.PathLike, dict, list],
                   node_types: Optional[Mapping[str, "NodeType"]] = None) -> Dict[str, Workflow]:
    """Read and validate workflows from a JSON file path, or from the same data as Python objects.

    Raises WorkflowFileError with one message naming the workflow and node at fault.
    """
    node_types = NODE_TYPES if node_types is None else node_types
    if isinstance(source, (str, os.PathLike)):
        label = os.fspath(source)
        data = _read_json_file(label)
        created = int(os.path.getmtime(label))
        functions = FunctionFinder(os.path.dirname(os.path.abspath(label)))
    else:
        label, data, created = "workflows", source, int(time.time())
        functions = FunctionFinder("")
    items = data.get("workflows") if isinstance(data, dict) else data
    if not isinstance(items, list) or not items:
        raise WorkflowFileError(f'{label}: expected {{"workflows": [ ... ]}} with at least one workflow')
    workflows: Dict[str, Workflow] = {}
    for index, item in enumerate(items):
        workflow = _parse_workflow(item, label, index, node_types, created, functions)
        if workflow.name in workflows:
            raise WorkflowFileError(f"{label}: workflow {workflow.name!r}: the name is used twice; "
                                    "each workflow needs a unique name (it is the model id)")
        workflows[workflow.name] = workflow
    return workflows


def default_workflows_path() -> str:
    """``workflows.json`` in the current folder, else the one beside this module (for
    ``python path/to/cozyopenai.py`` from elsewhere, or the file copied into a deployment)."""
    tried = [os.path.abspath(DEFAULT_WORKFLOWS_PATH),
             os.path.join(os.path.dirname(os.path.abspath(__file__)), DEFAULT_WORKFLOWS_PATH)]
    found = next((path for path in tried if os.path.isfile(path)), None)
    if found is None:
        raise WorkflowFileError(f"{DEFAULT_WORKFLOWS_PATH}: not found in {tried[0]} nor {tried[1]}; "
                                "give one with --workflows")
    return found


def _read_json_file(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except OSError as exc:
        raise WorkflowFileError(f"{path}: cannot read it: {exc.strerror}") from None
    except ValueError as exc:
        raise WorkflowFileError(f"{path}: not valid JSON: {exc}") from None


class TextStream:
    """A node result that arrives in pieces. The runner joins them, and streams them
    straight into the answer when the node's output is the answer."""
    finish_reason: Optional[str] = None   # set by LLMClient.stream once read to its end ("stop", "length")

    def __init__(self, pieces: Iterable[str]):
        self._pieces = pieces

    def __iter__(self) -> Iterator[str]:
        return iter(self._pieces)

    def close(self) -> None:
        """Stop its producer now (an LLM's stream closes its connection): the runner calls it
        when it stops reading early, so nothing waits for the garbage collector to do it."""
        getattr(self._pieces, "close", lambda: None)()


@dataclass
class NodeContext:
    """What a node function may use besides its inputs."""
    node: Node
    workflow: Workflow
    llm: Optional[LLMClient]
    stop: threading.Event
    notes: List[str] = field(default_factory=list)   # the runner reports them as "note" events
    # For the node whose output is the answer, when the user asks for something about the last
    # answer and changes no value ("Add Details"): (that answer, what the user asked).
    follow_up: Optional[Tuple[str, str]] = None

    def note(self, text: str) -> None:
        """A line for the thinking block: why a fallback was used, why an answer stops early."""
        self.notes.append(str(text))


@dataclass(frozen=True)
class NodeType:
    """A kind of node: ``run(inputs, context)`` returns the node's output (or a TextStream).

    ``required`` inputs must be present; ``author_only`` inputs must be written in the
    workflow file, never fed by a link or the user; ``check(inputs, functions)`` validates
    the literal inputs at start-up (raise ValueError); ``functions`` finds a ``module:function``
    as `python` nodes do, beside the workflows file first. ``takes_context=False`` says ``run``
    never looks at its context: it is given None.
    """
    run: Callable[[Dict[str, Any], NodeContext], Any]
    required: Tuple[str, ...] = ()
    author_only: Tuple[str, ...] = ()
    check: Optional[Callable[[Dict[str, Any], FunctionFinder], None]] = None
    # False for a ``run`` that never looks at its context (template, output): it gets None, and
    # the runner makes no NodeContext for it (an object each node would cost every turn).
    takes_context: bool = True


class _TemplateFormatter(string.Formatter):
    """str.format with dotted paths into dicts and lists ({forecast.current.temperature})
    and no attribute access, so a template cannot reach into Python objects."""

    def get_field(self, field_name: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Tuple[Any, str]:
        return lookup_path(kwargs, field_name.split("."), field_name), field_name

    def format_field(self, value: Any, format_spec: str) -> str:
        """A template is text for people: a yes/no value reads "yes" or "no" ("Children coming
        along: no"), a whole number without ".0"; a format spec ({budget:.2f}) is applied as written."""
        if not format_spec and isinstance(value, (bool, float)):
            return shown_value(value)
        return super().format_field(value, format_spec)


def lookup_path(value: Any, path: Sequence[str], label: str) -> Any:
    for step in path:
        if isinstance(value, dict) and step in value:
            value = value[step]
        elif isinstance(value, list) and step.lstrip("-").isdigit() and -len(value) <= int(step) < len(value):
            value = value[int(step)]
        else:
            raise NodeFailed(f"{label!r} is not available (nothing at {step!r})")
    return value


def render_template(template: str, values: Mapping[str, Any]) -> str:
    if type(template) is not str:   # a number written as a template, say
        template = str(template)
    parts = _plain_template(template)
    if parts is not None:   # the same text as the formatter below, without its machinery
        filled = []
        for literal, name in parts:
            filled.append(literal)
            if name is not None:
                if name not in values:
                    raise NodeFailed(f"{name!r} is not available (nothing at {name!r})")
                value = values[name]
                kind = type(value)   # text and whole numbers, most values, are told apart with no call
                filled.append(value if kind is str else str(value) if kind is int else
                              shown_value(value) if isinstance(value, (bool, float)) else format(value, ""))
        return "".join(filled)
    try:
        return _TemplateFormatter().format(template, **values)
    except (ValueError, IndexError) as exc:
        raise NodeFailed(f"template error: {exc}") from None


@lru_cache(maxsize=256)   # a workflow's few templates, filled turn after turn
def _plain_template(template: str) -> Optional[Tuple[Tuple[str, Optional[str]], ...]]:
    """A template's (text, field name) parts when every field is a plain name with no format
    spec or conversion, as most are ("You said {word}"); None for any other template."""
    try:
        parts = tuple(string.Formatter().parse(template))
    except ValueError:
        return None
    if any(name is not None and (not name.isidentifier() or spec or conversion) for _, name, spec, conversion in parts):
        return None
    return tuple((literal, name) for literal, name, _, _ in parts)


def _check_template(inputs: Dict[str, Any], functions: Optional[FunctionFinder] = None) -> None:
    if inputs.get("template") is not None:
        list(string.Formatter().parse(str(inputs["template"])))  # raises ValueError on a stray brace


def run_template_node(inputs: Dict[str, Any], context: NodeContext) -> str:
    """Fills ``template`` with the other inputs: ``{name}``, ``{node_output.key}``."""
    return render_template(inputs["template"], inputs)


def run_output_node(inputs: Dict[str, Any], context: NodeContext) -> str:
    """Its ``text`` becomes the answer."""
    text = inputs["text"]
    return text if isinstance(text, str) else json.dumps(text, indent=2, ensure_ascii=False)


def run_llm_node(inputs: Dict[str, Any], context: NodeContext) -> Any:
    """One chat completion on the configured LLM: ``prompt``, optional ``system``,
    ``temperature``, ``max_tokens`` (default LLM_NODE_MAX_TOKENS). The whole answer must arrive
    within the node's ``timeout_seconds`` (default LLM_NODE_TIMEOUT_SECONDS). ``fallback``, a
    template, is rendered instead with no LLM configured, or when the LLM fails before its first token."""
    if context.llm is None:
        if "fallback" in inputs:
            return render_template(inputs["fallback"], inputs)
        raise NodeFailed("this node needs an LLM; start the server with --llm-base-url and --llm-model")
    messages = [{"role": "user", "content": str(inputs["prompt"])}]
    if inputs.get("system"):
        messages.insert(0, {"role": "system", "content": str(inputs["system"])})
    if context.follow_up:   # "More Concise": the last answer, then what the user asks of it
        messages += [{"role": "assistant", "content": context.follow_up[0]},
                     {"role": "user", "content": context.follow_up[1]}]
    try:
        max_tokens = _positive_integer(inputs.get("max_tokens", LLM_NODE_MAX_TOKENS), "max_tokens")
    except ValueError as exc:   # fed by a link or the user, so not checked at start-up
        raise NodeFailed(str(exc)) from None
    options = {"max_tokens": max_tokens}
    if "temperature" in inputs:
        options["temperature"] = inputs["temperature"]
    seconds = context.node.timeout_seconds or LLM_NODE_TIMEOUT_SECONDS
    # The stream is read by the runner after this returns, so this limit (not _call_within's,
    # which covers only this call) is what ends a long answer.
    stream = context.llm.stream(messages, within_seconds=seconds, stop=context.stop, **options)
    return TextStream(_bounded_answer(stream, inputs, context, seconds, max_tokens))


def _bounded_answer(stream: TextStream, inputs: Dict[str, Any], context: NodeContext,
                    seconds: float, max_tokens: int) -> Iterator[str]:
    """The LLM's pieces. If it fails before the first: the fallback, or NodeFailed. If it fails
    or runs out of time after some: what it wrote, then a line saying it stopped there."""
    host = context.llm.host if context.llm is not None else "the configured server"
    wrote = False
    try:
        try:
            for piece in stream:
                wrote = True
                yield piece
        finally:   # also when the reader stops early (the client left): the connection closes now
            stream.close()
    except LLMError as exc:
        if wrote:
            context.note(f"the language model at {host} stopped ({exc.reason}); kept what it had written.")
            yield _stopped_line(exc, seconds)
        elif "fallback" in inputs:
            context.note(f"the language model at {host} did not answer ({exc.reason}); "
                         "used the fallback template.")
            yield render_template(inputs["fallback"], inputs)
        else:
            raise NodeFailed(f"the language model at {host} did not answer ({exc.reason})") from None
        return
    if stream.finish_reason == "length":   # said in the answer too, so a reader does not take it for the whole
        context.note(f"the answer hit its limit of {max_tokens} tokens.")
        yield f"\n\n(Stopped here: the answer reached its limit of {max_tokens} tokens.)"


def _stopped_line(exc: LLMError, seconds: float) -> str:
    """Ends an answer cut short, so a reader does not take it for the whole one."""
    if isinstance(exc, LLMTimeout):
        return f"\n\n(Stopped here: the language model took longer than {seconds:g} s.)"
    return "\n\n(Stopped here: the language model stopped answering.)"


def _positive_integer(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name!r} must be a positive whole number, got {value!r}")
    return value


def _check_llm(inputs: Dict[str, Any], functions: Optional[FunctionFinder] = None) -> None:
    if inputs.get("max_tokens") is not None:
        _positive_integer(inputs["max_tokens"], "max_tokens")


def _check_http(inputs: Dict[str, Any], functions: Optional[FunctionFinder] = None) -> None:
    url = inputs.get("url")
    if url is not None and urlsplit(str(url)).scheme not in ("http", "https"):
        raise ValueError(f"'url' must start with http:// or https://, got {url!r}")
    headers = inputs.get("headers")
    if headers is not None and not isinstance(headers, dict):
        raise ValueError(f"'headers' must be an object of header names to text, not {_json_type(headers)}")
    for name, value in (headers or {}).items():   # the values may be secrets: only their type is named
        if not isinstance(value, str):
            raise ValueError(f"header {name!r} must be a string, not {_json_type(value)}")
        if "\r" in value or "\n" in value:
            raise ValueError(f"header {name!r} must be one line")


def _json_type(value: Any) -> str:
    """A value's type as JSON names it, as the client wrote it (every message names types so)."""
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "an array",
            dict: "an object", type(None): "null"}.get(type(value), type(value).__name__)


def run_http_node(inputs: Dict[str, Any], context: NodeContext) -> Any:
    """A request through requests. ``url`` may hold ``{placeholders}`` filled (URL-encoded)
    from the other inputs; ``method``, ``headers``, ``params``, ``json``, ``timeout_seconds``.
    The output is the parsed JSON body, or the text."""
    values = {name: quote(str(value), safe="") for name, value in inputs.items() if not isinstance(value, dict)}
    url = render_template(inputs["url"], values)
    host = urlsplit(url).hostname or "the server"   # errors name the host only: URLs may hold keys
    try:
        response = requests.request(str(inputs.get("method", "GET")).upper(), url,
                                    headers=inputs.get("headers"), params=inputs.get("params"),
                                    json=inputs.get("json"),
                                    timeout=float(inputs.get("timeout_seconds", HTTP_NODE_TIMEOUT_SECONDS)))
    except requests.Timeout:
        raise NodeFailed(f"{host} did not answer in time") from None
    except requests.RequestException as exc:
        raise NodeFailed(f"could not reach {host} ({type(exc).__name__})") from None
    if response.status_code >= 400:
        raise NodeFailed(f"{host} answered HTTP {response.status_code} {response.reason or ''}".strip())
    try:
        return response.json()
    except ValueError:
        return response.text


def _check_python(inputs: Dict[str, Any], functions: FunctionFinder) -> None:
    if inputs.get("function") is not None:
        functions(inputs["function"])


def run_python_node(inputs: Dict[str, Any], context: NodeContext) -> Any:
    """Calls ``function`` (``module:function``) with the other inputs as keyword arguments;
    inputs named 0, 1, ... go first, as positional arguments (for functions like time.sleep)."""
    positional = [inputs[name] for name in sorted((n for n in inputs if n.isdigit()), key=int)]
    keywords = {name: value for name, value in inputs.items() if name != "function" and not name.isdigit()}
    try:
        return context.workflow.functions(inputs["function"])(*positional, **keywords)
    except NodeFailed:
        raise
    except Exception as exc:
        raise NodeFailed(f"{inputs['function']} raised {type(exc).__name__}: {exc}") from None


class NodeTypes(dict):
    """Node types by name, to pass to make_app(node_types=...), with a decorator::

        node_types = NodeTypes()

        @node_types.register("shout", required=("text",))
        def shout(inputs, context):
            return inputs["text"].upper()
    """

    def register(self, name: str, **options: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def decorate(run: Callable[..., Any]) -> Callable[..., Any]:
            self[name] = NodeType(run, **options)
            return run
        return decorate


NODE_TYPES: Mapping[str, NodeType] = MappingProxyType({
    "template": NodeType(run_template_node, required=("template",), author_only=("template",),
                         check=_check_template, takes_context=False),
    "llm": NodeType(run_llm_node, required=("prompt",), check=_check_llm),
    "http": NodeType(run_http_node, required=("url",), author_only=("url", "method"), check=_check_http,
                     takes_context=False),
    "python": NodeType(run_python_node, required=("function",), author_only=("function",),
                       check=_check_python),
    "output": NodeType(run_output_node, required=("text",), takes_context=False),
})


####################################################################################
# Runner: nodes run when all their inputs are ready
####################################################################################

class RunEvent(NamedTuple):   # a tuple, not a frozen dataclass: several are made per turn, and cheaply
    """What the runner reports. what: "started", "finished" (with seconds and value),
    "failed" (with seconds and text), "note" (a line for the thinking block, from
    NodeContext.note, in the order noted), "answer" (a piece of the answer), "done".
    The runner makes them with positional fields: keywords would cost a dict for each."""
    what: str
    node_id: str = ""
    text: str = ""
    seconds: float = 0.0
    value: Any = None


# A RunEvent made from the plain tuple of its fields, every one given: RunEvent(...) would be a
# Python call (the NamedTuple's constructor). Inside, the runner makes its events as plain
# (what, node_id, text, seconds, value) tuples, cheaper still (a RunEvent costs some 2,000
# instructions to make, a tuple a third of that); run_workflow gives them as RunEvents, and the
# turn, which reads every event of every run, reads them as they are (_run_events).
new_event = partial(tuple.__new__, RunEvent)
PlainEvent = Tuple[str, str, str, float, Any]   # a RunEvent's fields, as a plain tuple


def run_workflow(workflow: Workflow, values: Mapping[str, Any], *,
                 node_types: Optional[Mapping[str, NodeType]] = None, llm: Optional[LLMClient] = None,
                 stop: Optional[threading.Event] = None,
                 follow_up: Optional[Tuple[str, str]] = None, metrics: Any = None) -> Iterator[RunEvent]:
    """Run ``workflow`` with the query ``values``, yielding progress as it happens.

    Independent nodes run side by side in threads; a plain chain runs in the caller's
    thread. The answer arrives as "answer" events (streamed when it comes from an `llm`
    node), then "done". A failure yields "failed" and starts nothing more. Closing the
    generator (the client hung up) sets ``stop`` so no new node starts. ``follow_up`` goes to
    the node whose output is the answer (see NodeContext). With ``metrics``, the run is counted
    (runs by outcome, failed nodes by type). Nothing runs before the first event is asked for.
    """
    node_types = NODE_TYPES if node_types is None else node_types
    return _as_run_events(_run_events(workflow, values, node_types, llm, stop or StopSignal(), follow_up, metrics))


def _run_events(workflow: Workflow, values: Mapping[str, Any], node_types: Mapping[str, NodeType],
                llm: Optional[LLMClient], stop: threading.Event, follow_up: Optional[Tuple[str, str]],
                metrics: Any) -> Iterator[PlainEvent]:
    """run_workflow's events, as the plain tuples of their fields (see new_event)."""
    outputs: Dict[str, Any] = {}
    if workflow.chain is not None:   # in the caller's thread: no hand-off to make
        events = _chain_events(workflow, outputs, values, node_types, llm, stop, follow_up)
    else:
        events = _side_by_side_events(workflow, outputs, values, node_types, llm, stop, follow_up)
    return _counted_run(workflow, events, outputs, stop, metrics)


def _as_run_events(events: Iterator[PlainEvent]) -> Iterator[RunEvent]:
    """The events as RunEvents; closing this closes the run."""
    try:
        for event in events:
            yield new_event(event)
    finally:
        events.close()   # type: ignore[attr-defined]


def _counted_run(workflow: Workflow, events: Iterator[PlainEvent], outputs: Dict[str, Any],
                 stop: threading.Event, metrics: Any) -> Iterator[PlainEvent]:
    """The nodes' events, stopped at the first failure, then the answer (unless an `llm` node
    streamed it) and "done"; the run counted by its outcome."""
    answer_streamed, outcome = False, "stopped"
    try:
        for event in events:
            what = event[0]   # (what, node_id, text, seconds, value)
            if what == "failed":
                outcome = "failed"
                if metrics is not None:
                    metrics.add("node_failures_total", type=workflow.node(event[1]).type)
                yield event
                return
            if what == "answer":
                answer_streamed = True
            yield event
        answer = outputs[workflow.output_node]
        if not answer_streamed:
            yield ("answer", workflow.output_node, answer, 0.0, None)
        outcome = "ok"
        yield ("done", workflow.output_node, answer, 0.0, None)
    finally:
        stop.set()   # also on failure and GeneratorExit: threads still running start nothing new
        if metrics is not None:
            metrics.count_run(workflow.name, outcome)


def _chain_events(workflow: Workflow, outputs: Dict[str, Any], values: Mapping[str, Any],
                  node_types: Mapping[str, NodeType], llm: Optional[LLMClient], stop: threading.Event,
                  follow_up: Optional[Tuple[str, str]]) -> Iterator[PlainEvent]:
    """A chain's events: its nodes one after another, each output kept for the next; the
    events end with the first "failed", as _side_by_side_events' do."""
    for node, started, streams_answer in _chain_steps(workflow):
        yield started
        for event in _node_run(workflow, node, outputs, values, node_types, llm, stop, streams_answer,
                               follow_up if streams_answer else None):
            yield event
        if event[0] == "failed":
            return
        outputs[node.id] = event[4]   # its last event is its "finished", with the value


def _chain_steps(workflow: Workflow) -> Tuple[Tuple[Node, PlainEvent, bool], ...]:
    """A chain's nodes, each with its "started" event and whether it streams the answer:
    the same every run, so worked out once per workflow."""
    steps = workflow.derived.get("chain_steps")
    if steps is None:
        streams_answer = workflow.answer_source()
        steps = workflow.derived["chain_steps"] = tuple((node, _started(node.id, node.description),
                                                         node.id == streams_answer) for node in workflow.chain or ())
    return steps


def _side_by_side_events(workflow: Workflow, outputs: Dict[str, Any], values: Mapping[str, Any],
                         node_types: Mapping[str, NodeType], llm: Optional[LLMClient], stop: threading.Event,
                         follow_up: Optional[Tuple[str, str]]) -> Iterator[PlainEvent]:
    """The nodes of a workflow with branches, each started as soon as its inputs are ready:
    independent ones side by side in threads, a node ready on its own in the caller's thread.
    Each output is kept in ``outputs``; the events end with the first "failed"."""
    waiting = {node.id: node.dependencies() for node in workflow.nodes}
    finished: "queue.SimpleQueue[PlainEvent]" = queue.SimpleQueue()
    threaded: set = set()                       # nodes running in threads right now
    streams_answer = workflow.answer_source()

    def events_of(node_id: str) -> Iterator[PlainEvent]:
        return _node_events(workflow, workflow.node(node_id), outputs, values, node_types, llm, stop,
                            node_id == streams_answer, follow_up if node_id == streams_answer else None)
    while waiting or threaded:
        ready = [node_id for node_id, deps in waiting.items() if not deps]
        for node_id in ready:
            del waiting[node_id]
        if len(ready) == 1 and not threaded:   # no thread hand-off for it
            events = events_of(ready[0])
        else:
            for node_id in ready:
                _start_in_thread(events_of(node_id), finished)
            threaded.update(ready)
            events = iter([finished.get()])
        for event in events:
            yield event
            what, node_id = event[0], event[1]   # (what, node_id, text, seconds, value)
            if what in ("finished", "failed"):
                threaded.discard(node_id)
            if what == "failed":
                return
            if what == "finished":
                outputs[node_id] = event[4]
                for deps in waiting.values():
                    deps.discard(node_id)


def _start_in_thread(events: Iterator[PlainEvent], sink: "queue.SimpleQueue[PlainEvent]") -> None:
    def pump() -> None:
        for event in events:
            sink.put(event)
    threading.Thread(target=pump, daemon=True).start()


def _node_events(workflow: Workflow, node: Node, outputs: Mapping[str, Any], values: Mapping[str, Any],
                 node_types: Mapping[str, NodeType], llm: Optional[LLMClient], stop: threading.Event,
                 streams_answer: bool, follow_up: Optional[Tuple[str, str]] = None) -> Iterator[PlainEvent]:
    """Runs one node: "started", then any "note" and "answer" events in the order they happen,
    then "finished" or "failed"."""
    yield _started(node.id, node.description)
    yield from _node_run(workflow, node, outputs, values, node_types, llm, stop, streams_answer, follow_up)


@lru_cache(maxsize=256)   # a workflow's few nodes, run turn after turn
def _started(node_id: str, description: str) -> PlainEvent:
    """A node's "started" event: the same each time it runs, so made once."""
    return ("started", node_id, description, 0.0, None)


def _node_run(workflow: Workflow, node: Node, outputs: Mapping[str, Any], values: Mapping[str, Any],
              node_types: Mapping[str, NodeType], llm: Optional[LLMClient], stop: threading.Event,
              streams_answer: bool, follow_up: Optional[Tuple[str, str]] = None) -> Iterable[PlainEvent]:
    """Runs one node, once its "started" is out: its events after that. A node whose result is
    whole runs now, in this call, and its "note" events and "finished" (or "failed") come as a
    list, with no generator step each; a TextStream is read by a generator (_stream_events)."""
    started = time.monotonic()
    context: Optional[NodeContext] = None   # none for a node type that never looks at it: one object less a node
    try:
        node_type = node_types[node.type]
        if node_type.takes_context:
            context = NodeContext(node, workflow, llm, stop, [], follow_up)
        if stop.is_set():
            raise NodeFailed("the run was stopped")
        written, references = node.filling
        inputs = written.copy()   # in the file's order; each reference filled in
        for name, where, key in references:   # a query input or a whole output here, with no call each
            if where is QueryRef:
                inputs[name] = values[key]
            elif where is Link:
                inputs[name] = outputs[key]
            else:
                inputs[name] = _input_value(workflow, key, outputs, values)
        run = node_type.run
        result = run(inputs, context) if node.timeout_seconds is None else _call_within(node.timeout_seconds, run,
                                                                                         inputs, context)
    except (NodeFailed, UpstreamError) as exc:
        return [*_note_events(context), ("failed", node.id, exc.message, time.monotonic() - started, None)]
    except Exception as exc:   # a custom node's bug must end the run, not the server
        return [_node_bug(workflow, node, exc, started)]
    if type(result) is not str and isinstance(result, TextStream):   # most results are text: no isinstance
        return _stream_events(workflow, node, result, context or NodeContext(node, workflow, llm, stop, [], follow_up),
                              started, streams_answer)
    finished = ("finished", node.id, "", time.monotonic() - started, result)
    return [*_note_events(context), finished] if context is not None and context.notes else (finished,)


def _stream_events(workflow: Workflow, node: Node, result: TextStream, context: NodeContext, started: float,
                   streams_answer: bool) -> Iterator[PlainEvent]:
    """A node's TextStream, read: its "note" events as they are noted, its pieces as "answer"
    events when it streams the answer, then "finished" with the whole text (or "failed")."""
    stop = context.stop
    try:
        yield from _note_events(context)
        pieces = []
        try:
            for piece in result:
                if stop.is_set():
                    raise NodeFailed("the run was stopped")
                pieces.append(piece)
                if context.notes:   # noted before this piece came
                    yield from _note_events(context)
                if streams_answer:
                    yield ("answer", node.id, piece, 0.0, None)
        finally:   # stopped, failed or closed (the client left): its producer stops now
            result.close()
        yield from _note_events(context)
    except (NodeFailed, UpstreamError) as exc:
        yield from _note_events(context)
        yield ("failed", node.id, exc.message, time.monotonic() - started, None)
        return
    except Exception as exc:   # a custom node's bug must end the run, not the server
        yield _node_bug(workflow, node, exc, started)
        return
    yield ("finished", node.id, "", time.monotonic() - started, "".join(pieces))


def _node_bug(workflow: Workflow, node: Node, exc: Exception, started: float) -> PlainEvent:
    """The "failed" event of a node that raised what no node should: logged with its trace."""
    trace = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    log.error("node %s of %s raised:\n%s", node.id, workflow.name, workflow.redact(trace))
    return ("failed", node.id, f"{type(exc).__name__}: {exc}", time.monotonic() - started, None)


def _note_events(context: Optional[NodeContext]) -> Iterator[PlainEvent]:
    while context is not None and context.notes:   # none for a node type that takes no context
        yield ("note", context.node.id, context.notes.pop(0), 0.0, None)


def _call_within(seconds: Optional[float], function: Callable[..., Any], *arguments: Any) -> Any:
    """function(*arguments), failing the node after ``seconds``. Python cannot stop a thread:
    the call goes on in the background, but the run moves on without it. A TextStream the
    function returns is read afterwards, outside this limit: an `llm` node bounds its own."""
    if seconds is None:
        return function(*arguments)
    outcome: Dict[str, Any] = {}

    def call() -> None:
        try:
            outcome["value"] = function(*arguments)
        except BaseException as exc:   # re-raised in the runner's thread
            outcome["error"] = exc
    worker = threading.Thread(target=call, daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        raise NodeFailed(f"did not finish within {seconds:g} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _input_value(workflow: Workflow, value: Any, outputs: Mapping[str, Any], values: Mapping[str, Any]) -> Any:
    if isinstance(value, Link):
        if not value.path:   # the whole output, as most links take it
            return outputs[value.node]
        return lookup_path(outputs[value.node], value.path, ".".join((value.node,) + value.path))
    if isinstance(value, QueryRef):
        return values[value.name]
    if isinstance(value, FixedRef):
        return workflow.fixed_inputs[value.name]
    return value


# So two first waiters of a StopSignal share one Event: one lock for all, as a first wait is
# seldom and brief, rather than a lock made with every turn's signal.
_MAKING_STOP_EVENTS = threading.Lock()


class StopSignal:
    """A turn's stop signal: threading.Event's is_set, set, clear and wait, for less. A turn
    sets it and looks at it, but seldom waits on it (a node that sleeps, a stream's LLM call):
    the Event, with its Condition and lock (some 30,000 instructions made and set twice), is
    made only for the first wait. Slots: one is made every turn, its fields stored with no dict."""
    __slots__ = ("_flag", "_event")

    def __init__(self) -> None:
        self._flag = False
        self._event: Optional[threading.Event] = None   # made by the first wait

    def is_set(self) -> bool:
        return self._flag

    def set(self) -> None:
        self._flag = True   # before the Event is read: a waiter that made it after looks at the flag again
        if self._event is not None:
            self._event.set()

    def clear(self) -> None:
        self._flag = False
        if self._event is not None:
            self._event.clear()

    def wait(self, timeout: Optional[float] = None) -> bool:
        if self._flag:
            return True
        with _MAKING_STOP_EVENTS:
            if self._event is None:
                self._event = threading.Event()
        if self._flag:   # set while the Event was being made, before set() could see it
            return True
        return self._event.wait(timeout) or self._flag


class HangUpAwareEvent(StopSignal):
    """The turn's stop signal. It also turns set when the client has closed its connection,
    which the runner checks before starting each node: nothing new starts for no one."""
    __slots__ = ("_connection", "_next_check")

    def __init__(self, connection: Optional[socket.socket] = None):
        self._flag, self._event = False, None   # StopSignal's fields, set here: a call less each turn
        self._connection = connection
        self._next_check = time.monotonic() + HANGUP_CHECK_SECONDS

    def is_set(self) -> bool:
        # A system call per check would cost every fast turn under load: look at the socket
        # at most every HANGUP_CHECK_SECONDS, and never in a turn quicker than that.
        if not self._flag and self._connection is not None and time.monotonic() >= self._next_check:
            self._next_check = time.monotonic() + HANGUP_CHECK_SECONDS
            if _peer_closed(self._connection):
                self.set()
        return self._flag

    def wait(self, timeout: Optional[float] = None) -> bool:
        """As Event.wait, and a hang-up ends the wait too (a node that waits on the stop signal
        must not run on for a client that left): the socket is looked at every check."""
        if self._connection is None:
            return super().wait(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.is_set():
            left = HANGUP_CHECK_SECONDS if deadline is None else min(HANGUP_CHECK_SECONDS, deadline - time.monotonic())
            if left <= 0:
                return False
            super().wait(left)
        return True


def _peer_closed(connection: socket.socket) -> bool:
    try:
        readable, _, _ = select.select([connection], [], [], 0)
        return bool(readable) and connection.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


####################################################################################
# The internal LLM (extraction, questions and `llm` nodes)
####################################################################################

@dataclass(frozen=True)
class LLMSettings:
    """Where the internal LLM is: any OpenAI-compatible server."""
    base_url: str
    model: str
    api_key: str = field(default="", repr=False)
    timeout_seconds: float = LLM_TIMEOUT_SECONDS
    max_retries: int = 1                   # on timeouts, refused connections, 429 and 5xx
    # The extraction call also writes the follow-up question, one call a gathering turn: None (the
    # default) does so while the upstream takes structured output, True always, False never (a
    # question call of its own).
    single_call: Optional[bool] = None


class TurnBudget:
    """What a turn allows its own calls to the LLM (extraction, question): one attempt each,
    all of them within ``seconds`` from the turn's start, and none going on once ``stop`` is
    set (the client left). Given to LLMClient.within around the calls."""

    def __init__(self, stop: threading.Event, seconds: float):
        self.stop, self.seconds = stop, seconds
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()


class _UpstreamSockets:
    """The socket each thread is reading or writing right now in a call to the LLM, so that a
    call can be cut from another thread: a socket another thread is blocked reading from is not
    freed by close(), but shutdown() ends the read and the upstream sees the connection go,
    so it stops generating. Installed by wrapping the HTTP client's network backend (httpcore's,
    under the openai SDK); where that cannot be found, a call given up is left to finish."""

    def __init__(self) -> None:
        self._by_thread: Dict[int, Any] = {}

    def install(self, http_client: Any) -> bool:
        pool = getattr(getattr(http_client, "_transport", None), "_pool", None)
        backend = getattr(pool, "_network_backend", None)
        if backend is None or not hasattr(backend, "connect_tcp"):
            return False
        pool._network_backend = _TrackedBackend(backend, self)
        return True

    @contextlib.contextmanager
    def using(self, stream: Any) -> Iterator[None]:
        thread = threading.get_ident()
        self._by_thread[thread] = stream
        try:
            yield
        finally:
            self._by_thread.pop(thread, None)

    def cut(self, thread: threading.Thread) -> bool:
        """Shut down the socket ``thread`` is using, if it still runs; whether there was one."""
        stream = self._by_thread.get(thread.ident or -1) if thread.is_alive() else None
        sock = stream.get_extra_info("socket") if stream is not None else None
        if sock is None:
            return False
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        return True


class _TrackedBackend:
    """A network backend whose streams say which thread uses them (see _UpstreamSockets)."""

    def __init__(self, backend: Any, sockets: _UpstreamSockets):
        self._backend, self._sockets = backend, sockets

    def connect_tcp(self, *arguments: Any, **options: Any) -> "_TrackedStream":
        return _TrackedStream(self._backend.connect_tcp(*arguments, **options), self._sockets)

    def connect_unix_socket(self, *arguments: Any, **options: Any) -> "_TrackedStream":
        return _TrackedStream(self._backend.connect_unix_socket(*arguments, **options), self._sockets)

    def __getattr__(self, name: str) -> Any:   # sleep, and whatever a later version adds
        return getattr(self._backend, name)


class _TrackedStream:
    def __init__(self, stream: Any, sockets: _UpstreamSockets):
        self._stream, self._sockets = stream, sockets

    def read(self, *arguments: Any, **options: Any) -> bytes:
        with self._sockets.using(self._stream):
            return self._stream.read(*arguments, **options)

    def write(self, *arguments: Any, **options: Any) -> None:
        with self._sockets.using(self._stream):
            return self._stream.write(*arguments, **options)

    def start_tls(self, *arguments: Any, **options: Any) -> "_TrackedStream":
        return _TrackedStream(self._stream.start_tls(*arguments, **options), self._sockets)

    def __getattr__(self, name: str) -> Any:   # close, get_extra_info
        return getattr(self._stream, name)


class LLMClient:
    """The openai client for one upstream, with a memory of which structured-output mode it accepts."""

    # Tried in order: strict JSON schema, then JSON mode (llama.cpp refuses json_schema but takes
    # json_object), then plain text from which the first JSON object is parsed.
    JSON_MODES = ("json_schema", "json_object", "text")
    FORMAT_WORDS = re.compile(r"response_format|json_schema|json_object")   # in an error body: a refusal

    def __init__(self, settings: LLMSettings, metrics: Optional["Metrics"] = None):
        import openai  # about 0.4 s to import; only servers with an LLM pay for it
        self._openai = openai
        self.settings = settings
        self.metrics = metrics
        self._client = openai.OpenAI(base_url=settings.base_url, api_key=settings.api_key or "unused",
                                     timeout=settings.timeout_seconds, max_retries=settings.max_retries)
        # A mode never seen working is tried without the client's retry: an upstream that refuses
        # it (llama.cpp answers json_schema with a 500) then costs one call per server run, not two a turn.
        self._client_once = self._client.with_options(max_retries=0)
        self._json_mode = 0                    # index in JSON_MODES; only ever steps down
        self._json_mode_confirmed = False      # the current mode has answered once on this upstream
        self._json_lock = threading.Lock()     # turns run at once
        self._sockets = _UpstreamSockets()
        self._cuttable = self._sockets.install(getattr(self._client, "_client", None))
        self._turn = threading.local()         # .budget: the TurnBudget of the turn calling on this thread

    @contextlib.contextmanager
    def within(self, budget: Optional[TurnBudget]) -> Iterator[None]:
        """The calls made on this thread inside the block are the turn's own: one attempt each,
        within the budget, given up (and their connection closed) once its stop is set."""
        previous = getattr(self._turn, "budget", None)
        self._turn.budget = budget
        try:
            yield
        finally:
            self._turn.budget = previous

    @property
    def asks_in_extraction(self) -> bool:
        """Whether the extraction call also writes the question (LLMSettings.single_call)."""
        if self.settings.single_call is not None:
            return self.settings.single_call
        return self.JSON_MODES[self._json_mode] != "text"

    @property
    def host(self) -> str:
        """The upstream's host:port, to name it in notes and logs: never its path, query or key."""
        parts = urlsplit(self.settings.base_url)
        host = parts.hostname or "the configured server"
        host = f"[{host}]" if ":" in host else host
        try:
            port = parts.port
        except ValueError:
            port = None
        return f"{host}:{port}" if port else host

    def complete(self, messages: List[dict], **options: Any) -> str:
        """One chat completion; its text. Temperature 0 unless asked otherwise: the server's own
        calls must read and ask the same way each time."""
        options.setdefault("temperature", 0)
        return self._text_of(self._call(messages=messages, stream=False, **options))

    def complete_json(self, messages: List[dict], schema: dict, **options: Any) -> dict:
        """A JSON object as answer, using the best structured-output mode the upstream takes.

        A refused mode is stepped down from and remembered. An unexplained 5xx on a json_schema
        call never seen working steps down for this call only, and is remembered once json_object
        works: so a real outage does not walk the mode down for good. Temperature 0 unless asked
        otherwise: the same message is read the same way each time."""
        options.setdefault("temperature", 0)
        index = self._json_mode
        while True:
            mode = self.JSON_MODES[index]
            confirmed = self._is_confirmed(index)
            try:
                response = self._call(messages=messages, stream=False, retry=confirmed,
                                      **options, **self._json_options(mode, schema))
            except LLMError as exc:
                refusal = self._refusal(exc, mode, confirmed)
                if refusal is None:
                    raise
                if refusal == "refused":
                    self._settle_json_mode(index + 1, worked=False)
                index += 1
                continue
            self._settle_json_mode(index, worked=True)
            return first_json_object(self._text_of(response))

    @staticmethod
    def _json_options(mode: str, schema: dict) -> Dict[str, Any]:
        if mode == "json_schema":
            return {"response_format": {"type": "json_schema", "json_schema":
                                        {"name": "extraction", "schema": schema, "strict": True}}}
        if mode == "json_object":
            return {"response_format": {"type": "json_object"}}
        return {}

    def _is_confirmed(self, index: int) -> bool:
        """Plain text is no structured call; a structured mode once it has answered here."""
        return self.JSON_MODES[index] == "text" or (index == self._json_mode and self._json_mode_confirmed)

    @staticmethod
    def _refusal(exc: LLMError, mode: str, confirmed: bool) -> Optional[str]:
        """"refused" when the upstream said it does not take this mode, "unexplained" for a 5xx on a
        json_schema call never seen working (llama.cpp's refusal may say nothing useful), else None:
        a mode that has worked is not given up over a 400 about something else, nor over an outage."""
        status = exc.upstream_status or 0
        if mode == "text" or status < 400:
            return None
        if exc.names_format or (not confirmed and status in (400, 422)):
            return "refused"
        if not confirmed and mode == "json_schema" and status >= 500:
            return "unexplained"
        return None

    def _settle_json_mode(self, index: int, worked: bool) -> None:
        """Remember that mode ``index`` answered, or that the ones above it were refused. The mode
        only steps down, so turns that learn the same thing at once change it, and log it, once."""
        with self._json_lock:
            previous = self._json_mode
            if index > previous:
                self._json_mode, self._json_mode_confirmed = index, False
            if worked and index == self._json_mode:
                self._json_mode_confirmed = True
        if index > previous and self.metrics is not None:
            self.metrics.add("llm_format_refusals_total")
        if index > previous:
            log.warning("the language model at %s does not take response_format %s; using %s from now on",
                        self.host, self.JSON_MODES[previous],
                        "prompt-only text" if self.JSON_MODES[index] == "text" else self.JSON_MODES[index])

    def stream(self, messages: List[dict], *, within_seconds: Optional[float] = None,
               stop: Optional[threading.Event] = None, **options: Any) -> "TextStream":
        """A chat completion whose tokens arrive as they are generated; the request goes out when
        the stream is first read, and failures raise LLMError from the reading. With
        ``within_seconds`` the whole answer, request to last token, must arrive in that time, even
        when the upstream stalls between tokens: past it, reading raises LLMTimeout. Read to its
        end, the stream's ``finish_reason`` says why the model stopped ("stop", "length"). Once
        ``stop`` is set (the client left), reading raises LLMError and the connection is cut,
        without waiting for the upstream's next token."""
        request = dict(options, messages=messages)
        if within_seconds is not None:   # so a stalled connection is also given up soon after the deadline
            request.setdefault("timeout", min(self.settings.timeout_seconds, within_seconds))

        def pieces() -> Iterator[str]:
            arrived: "queue.SimpleQueue[Tuple[str, Any]]" = queue.SimpleQueue()
            leaving = threading.Event()
            deadline = None if within_seconds is None else time.monotonic() + within_seconds
            reader = threading.Thread(target=self._read_stream, args=(request, arrived, leaving), daemon=True)
            reader.start()
            ended = False
            try:
                while True:
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:   # checked per piece too: a fast, endless model
                        raise LLMTimeout(f"timed out after {within_seconds:g} s")
                    if stop is not None and stop.is_set():
                        raise LLMError("the run was stopped")
                    try:
                        tag, value = arrived.get(timeout=left if stop is None else min(left or math.inf,
                                                                                         HANGUP_CHECK_SECONDS))
                    except queue.Empty:
                        continue
                    if tag == "piece":
                        yield value
                    elif tag == "end":
                        ended = True
                        finish[0] = value
                        return
                    else:
                        ended = True
                        raise value
            finally:
                leaving.set()   # the reading thread closes the connection at its next chunk, or now:
                if not ended and self._sockets.cut(reader) and self.metrics is not None:
                    self.metrics.add("llm_calls_cut_total")
        finish: List[Optional[str]] = [None]   # no reference from the pieces to the stream: no cycle to wait for
        return _LLMStream(pieces(), finish)

    def _read_stream(self, request: Dict[str, Any], arrived: "queue.SimpleQueue[Tuple[str, Any]]",
                     leaving: threading.Event) -> None:
        """In a thread of its own, so that a stalled upstream cannot hold the reader past its
        deadline: puts ("piece", text)..., then ("end", finish_reason) or ("error", LLMError)."""
        response, finish_reason = None, None
        try:
            response = self._call(stream=True, **request)
            for chunk in response:
                if leaving.is_set():
                    return   # the reader gave up; closing the connection stops the upstream's work too
                choice = chunk.choices[0] if chunk.choices else None
                if choice is not None and choice.delta is not None and choice.delta.content:
                    arrived.put(("piece", choice.delta.content))
                finish_reason = (choice.finish_reason if choice is not None else None) or finish_reason
            arrived.put(("end", finish_reason))
        except LLMError as exc:
            arrived.put(("error", exc))
        except Exception as exc:   # the SDK's errors, and a connection or chunk broken under it
            arrived.put(("error", self._upstream_error(exc)))
        finally:
            if response is not None:
                response.close()

    def _call(self, *, retry: bool = True, **options: Any) -> Any:
        options.setdefault("model", self.settings.model)
        budget = getattr(self._turn, "budget", None)
        if budget is not None and not options.get("stream"):
            return self._call_within_budget(budget, options)
        return self._call_now(retry, options)

    def _call_within_budget(self, budget: TurnBudget, options: Dict[str, Any]) -> Any:
        """One attempt, no retry, within what is left of the turn's budget, on a thread of its own
        so that a client who leaves ends it: its connection is cut at once, and the turn moves on."""
        left = budget.left()
        if left <= 0.05:
            raise LLMTimeout(f"no time left of the turn's {budget.seconds:g} s")
        options["timeout"] = min(float(options.get("timeout") or self.settings.timeout_seconds), left)
        outcome: Dict[str, Any] = {}
        done = threading.Event()

        def call() -> None:
            try:
                outcome["value"] = self._call_now(False, options)
            except BaseException as exc:   # re-raised on the turn's thread
                outcome["error"] = exc
            finally:
                done.set()
        worker = threading.Thread(target=call, daemon=True)
        worker.start()
        while not done.wait(HANGUP_CHECK_SECONDS):
            out_of_time = budget.left() <= 0   # the SDK's timeout bounds each read, not the whole call
            if budget.stop.is_set() or out_of_time:   # the client left, or the turn cannot wait longer
                if self._sockets.cut(worker) and self.metrics is not None:
                    self.metrics.add("llm_calls_cut_total")
                outcome["error"] = LLMTimeout(f"timed out after {budget.seconds:g} s") if out_of_time else \
                    LLMError("the client left")
                break
        if "error" in outcome:
            if isinstance(outcome["error"], LLMTimeout):
                log.warning("the language model at %s did not answer within %.3g s (what was left of the turn's "
                            "%g s); the turn goes on without it", self.host, options["timeout"], budget.seconds)
            raise outcome["error"]
        return outcome["value"]

    def _call_now(self, retry: bool, options: Dict[str, Any]) -> Any:
        client = self._client if retry else self._client_once
        started, outcome = time.monotonic(), "error"
        try:
            response = client.chat.completions.create(**options)
            outcome = "ok"
            return response
        except self._openai.OpenAIError as exc:
            raise self._upstream_error(exc) from None
        finally:
            if self.metrics is not None:
                self.metrics.add("llm_calls_total", outcome=outcome)
                self.metrics.observe("llm_call_seconds", time.monotonic() - started)

    @staticmethod
    def _text_of(response: Any) -> str:
        return (response.choices[0].message.content or "") if response.choices else ""

    def _upstream_error(self, exc: Exception) -> LLMError:
        if isinstance(exc, self._openai.APITimeoutError):
            return LLMTimeout("timed out")
        status = getattr(exc, "status_code", None)
        reason = f"HTTP {status}" if status else type(exc).__name__.replace("API", "").replace("Error", " error")
        said = f"{getattr(exc, 'message', '')} {json.dumps(getattr(exc, 'body', None), default=str)}"
        return LLMError(reason.strip(), upstream_status=status,
                        names_format=bool(status) and bool(self.FORMAT_WORDS.search(said)))


class _LLMStream(TextStream):
    """LLMClient.stream's answer: its finish reason is set once the stream is read to its end."""

    def __init__(self, pieces: Iterator[str], finish: List[Optional[str]]):
        super().__init__(pieces)
        self._finish = finish

    @property   # type: ignore[override]
    def finish_reason(self) -> Optional[str]:
        return self._finish[0]


def first_json_object(text: str) -> dict:
    """The first JSON object in a model's text (some wrap it in prose or a code fence)."""
    decoder = json.JSONDecoder()
    for match in re.finditer(r"\{", text or ""):
        try:
            value, _ = decoder.raw_decode(text, match.start())
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    raise UpstreamError("the language model's answer held no JSON object")


####################################################################################
# Conversations and their stores
####################################################################################

def _set_fields(instance: Any, given: Mapping[str, Any]) -> None:
    """The fields given to the constructor of a dataclass that writes its own __init__; the others
    keep their class defaults. A name that is no field is refused, as the dataclass's own __init__ would."""
    for name, value in given.items():
        if name not in instance.__dataclass_fields__:
            raise TypeError(f"{type(instance).__name__}() got an unexpected keyword argument {name!r}")
        setattr(instance, name, value)


@dataclass(init=False)
class Conversation:
    """What the server remembers of one chat with one workflow: every turn's resulting state
    as a snapshot, never changed once written (an edit or a regenerated reply goes back to
    one), and the state this turn works on.

    Chat clients send histories that branch: an earlier message edited, a reply regenerated
    (with or without an instruction), an older branch continued, a reply pasted into another
    chat. The state a request continues from is the snapshot behind the last reply in its
    own history that this server wrote: found by a digest of the reply as clients send it
    back (thinking and identifier removed, whitespace collapsed), the user turns before it
    breaking ties. So no branch ever undoes another."""
    id: str
    model: str
    values: Dict[str, Any] = field(default_factory=dict)   # the working state, from the snapshot continued
    asked: List[str] = field(default_factory=list)        # the inputs the last question asked for
    ask_counts: Dict[str, int] = field(default_factory=dict)
    runs: int = 0
    result: str = ""                                      # digest of the last run's answer, in `results`
    turns: int = 0
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    snapshots: List[dict] = field(default_factory=list)   # oldest first, the most recent SNAPSHOTS_KEPT
    results: Dict[str, str] = field(default_factory=dict)  # answers of runs, by digest, shared by snapshots
    responses: Dict[str, dict] = field(default_factory=dict)   # Responses API: stored responses, by id
    answered: Dict[str, dict] = field(default_factory=dict)    # request digest -> its answer, the newest
    # Conversations API: {"created_at", "metadata", "items"} of a conversation made there (None: not one).
    # Its items are the history a response with ``conversation`` continues; the model is set by its first.
    api: Optional[dict] = None
    parent: str = ""                                      # not stored: the snapshot this turn continues
    is_new: bool = False                                  # not stored: the id block goes out once

    def __init__(self, id: str, model: str, **given: Any) -> None:
        # One is made for every turn: cheaper than the dataclass's __init__, which calls a
        # default factory per field (two clock reads among them). Made now, both times are one.
        self.id, self.model = id, model
        self.values = {}; self.asked = []; self.ask_counts = {}
        self.runs = self.turns = 0
        self.result = self.parent = ""
        self.created = self.updated = time.time()
        self.snapshots = []; self.results = {}; self.responses = {}; self.answered = {}
        self.api = None
        self.is_new = False
        if given:
            _set_fields(self, given)

    STATE_FIELDS = ("values", "asked", "ask_counts", "runs", "result")

    def to_record(self) -> dict:
        record = {"version": RECORD_VERSION, "id": self.id, "model": self.model, "turns": self.turns,
                  "created": self.created, "updated": self.updated, "snapshots": self.snapshots,
                  "results": self.results, "responses": self.responses, "answered": self.answered}
        if self.api is not None:   # set, not merged in: most records have none, and a merge builds two dicts
            record["api"] = self.api
        return record

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> "Conversation":
        """A stored conversation; a record of version 1 (one mutable state) becomes one snapshot
        that any reply of that conversation continues from."""
        conversation = cls(record["id"], record["model"])   # then the stored fields: quicker than keywords
        get = record.get
        conversation.turns = get("turns", 0)
        conversation.created = get("created", conversation.created)
        conversation.updated = get("updated", conversation.updated)
        conversation.snapshots, conversation.results = list(get("snapshots", ())), dict(get("results", ()))
        conversation.responses, conversation.answered = dict(get("responses", ())), dict(get("answered", ()))
        conversation.api = get("api")
        if "snapshots" not in record:
            state = {name: record.get(name, default) for name, default in
                     (("values", {}), ("asked", []), ("ask_counts", {}), ("runs", 0))}
            conversation.snapshots = [{"key": LEGACY_SNAPSHOT, "reply": "", "users": "", "users_before": "",
                                       "parent": "", "at": conversation.updated, **state, "result": ""}]
        return conversation

    def restore(self, state: Mapping[str, Any]) -> None:
        self.values, self.asked = dict(state["values"]), list(state["asked"])
        self.ask_counts, self.runs, self.result = dict(state["ask_counts"]), state["runs"], state.get("result", "")

    def continue_from(self, messages: Sequence[dict], arrived: float) -> Tuple[Optional[dict], List[str]]:
        """Take the state behind the newest assistant message of ``messages`` that this
        conversation wrote; return its snapshot (None: none of them, and the state is empty)
        and the user turns to read again before the new one: those between it and a later
        reply of ours whose turns were edited in place. A turn saved while this request waited
        for the conversation's lock, from the same snapshot, is taken too: two messages sent at
        once both count."""
        self.restore({"values": {}, "asked": [], "ask_counts": {}, "runs": 0})
        replies = replies_in(messages)
        found, position = None, -1
        for position in range(len(replies) - 1, -1, -1):
            found = self.snapshot_of(replies[position].reply, replies[position].users)
            if found:
                break
        if found is None:
            found = next((s for s in self.snapshots if s["key"] == LEGACY_SNAPSHOT), None)
            return (self._take(found, arrived), []) if found else (None, [])
        ours = {s["reply"] for s in self.snapshots}
        later = [reply.index for reply in replies[position + 1:] if reply.reply in ours]
        again = user_turns(messages[replies[position].index + 1:later[-1]]) if later else []
        return self._take(found, arrived), again

    def continue_from_key(self, sid: str) -> Optional[dict]:
        """Take the state of exactly the snapshot ``sid`` (a stored response's): two responses
        continuing one each get their own branch, even when sent at once. None when not kept."""
        found = next((snapshot for snapshot in reversed(self.snapshots) if _sid(snapshot) == sid), None)
        if found is not None:
            self.restore(found)
            self.parent = sid
        return found

    def _take(self, found: dict, arrived: float) -> dict:
        seen = {_sid(found)}
        while True:   # follow turns of the same branch saved while this request waited
            later = [s for s in self.snapshots if s["parent"] == _sid(found) and s["at"] > arrived
                     and _sid(s) not in seen]
            if not later:
                break
            found = later[-1]
            seen.add(_sid(found))
        self.restore(found)
        self.parent = _sid(found)
        return found

    def snapshot_of(self, reply: str, users: str) -> Optional[dict]:
        """The newest snapshot for this reply after these user turns, or after them plus one
        the client no longer sends (Open WebUI drops a "Suggest a change" instruction); else
        the one for those user turns alone (a reply the client changed)."""
        for snapshot in reversed(self.snapshots):
            if snapshot["reply"] == reply and users in (snapshot["users"], snapshot["users_before"]):
                return snapshot
        if any(snapshot["reply"] == reply for snapshot in self.snapshots):
            return None   # our reply after other user turns: an earlier message edited in place
        return next((s for s in reversed(self.snapshots) if s["users"] == users and s["reply"]), None)

    def remember(self, reply_text: str, users: Tuple[str, str], answer: Optional[str], sid: str,
                 block: str = "") -> str:
        """Save this turn's resulting state as a new snapshot, keyed by the reply as written and
        ``users``, the digests of the user turns with and without the last. ``answer``: the
        workflow's answer, when it ran, to give again if asked for nothing new. ``sid``: the
        snapshot's id, random (ConversationIds.snapshot_id). ``block``: the identifier block the
        turn wrote after the reply, if any (see clean_own_reply). Returns the snapshot's id."""
        if answer is not None:
            self.result = text_digest(answer)
            self.results[self.result] = answer
        cleaned = clean_own_reply(reply_text, block)
        # Most replies are the answer itself (and the id block): its digest, worked out once.
        reply = self.result if answer is not None and cleaned == answer else text_digest(cleaned)
        key, parent = f"{reply}:{users[0]}", self.parent
        for snapshot in self.snapshots:   # a regenerated reply that came out the same, from the same state
            if (snapshot["key"] == key and snapshot["parent"] == parent and snapshot["values"] == self.values
                    and snapshot["asked"] == self.asked and snapshot["ask_counts"] == self.ask_counts
                    and snapshot["runs"] == self.runs and snapshot["result"] == self.result):
                sid = _sid(snapshot)
                break
        else:   # the state copied: the working one goes on changing
            snapshot = {"key": key, "sid": sid, "reply": reply, "users": users[0],
                        "users_before": users[1], "parent": parent, "at": time.time(), "values": dict(self.values),
                        "asked": list(self.asked), "ask_counts": dict(self.ask_counts), "runs": self.runs,
                        "result": self.result}
            self.snapshots.append(snapshot)
            if len(self.snapshots) > SNAPSHOTS_KEPT:
                del self.snapshots[:-SNAPSHOTS_KEPT]
                # Only then can an answer lose its last snapshot: this turn's is the new snapshot's.
                used = {s.get("result") for s in self.snapshots}
                self.results = {digest: text for digest, text in self.results.items() if digest in used}
        if self.responses:   # the Responses API's, of the snapshots still kept
            kept = {_sid(s) for s in self.snapshots}
            responses = [(rid, response) for rid, response in self.responses.items() if response["snapshot"] in kept]
            self.responses = dict(responses[-RESPONSES_KEPT:])
        return sid

    def keep_response(self, response_id: str, snapshot: str, thinking: str, answer: str, extra: Mapping[str, Any]) -> None:
        """A response of the Responses API, stored with the snapshot it left, to continue from."""
        self.responses[response_id] = {"snapshot": snapshot, "created_at": int(time.time()), "thinking": thinking,
                                       "answer": answer, **extra}

    def last_result(self) -> str:
        return self.results.get(self.result, "")

    def answer_request(self, digest: str, thinking: str, answer: str, snapshot: str) -> None:
        """Remember what the request with this digest (request_digest) was answered, so that
        the same request, sent again while this one ran, gets this answer instead of a second
        reading of its message. The newest ANSWERED_KEPT are kept: a twin waits for the
        conversation's lock, so it is always among the last few."""
        self.answered.pop(digest, None)
        self.answered[digest] = {"at": time.time(), "thinking": thinking, "answer": answer, "snapshot": snapshot}
        if len(self.answered) > ANSWERED_KEPT:   # copied only when there is something to drop
            self.answered = dict(list(self.answered.items())[-ANSWERED_KEPT:])

    def twin_of(self, digest: str, arrived: float) -> Optional[dict]:
        """The answer of the same request, if it was answered after ``arrived`` (this request
        came while it was in flight: a double click, a client's retry). One answered before
        this came is not a twin: the same history sent again later is a regenerated reply, read
        again from the state before it (and so read once)."""
        twin = self.answered.get(digest)
        return twin if twin is not None and twin["at"] >= arrived else None

    def missing(self, workflow: Workflow) -> List[QueryInput]:
        return workflow.missing(self.values)


def item_messages(items: Sequence[Mapping[str, Any]]) -> List[dict]:
    """Message items (Responses and Conversations APIs, content as parts) as chat messages;
    other items (reasoning, tool calls) are nothing a workflow reads."""
    return [{"role": item["role"], "content": "\n".join(part.get("text", "") for part in item.get("content", []))}
            for item in items if item.get("type") == "message" and item.get("role") in ("user", "assistant",
                                                                                         "system", "developer")]


def request_digest(model: str, messages: Sequence[dict], chat_key: str = "") -> str:
    """What makes two requests the same one: the model, the whole history (the new message
    included) and the conversation header's key."""
    sent = json_text([model, chat_key, [[m["role"], m["content"]] for m in messages]])
    return hashlib.sha256(sent.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def _sid(snapshot: Mapping[str, Any]) -> str:
    """A snapshot's own id (records before it had only the key)."""
    return snapshot.get("sid") or snapshot["key"]


def text_digest(text: str) -> str:
    """A short digest of a text, whitespace collapsed (clients trim it differently)."""
    return hashlib.sha256(" ".join(text.split()).encode("utf-8", "surrogatepass")).hexdigest()[:16]


NO_TEXT_DIGEST = text_digest("")


def digest_of_digests(digests: Sequence[str]) -> str:
    """text_digest of ``digests`` joined by spaces, without collapsing their whitespace: they
    have none (hex digits), so splitting and joining again would be work for nothing."""
    return hashlib.sha256(" ".join(digests).encode()).hexdigest()[:16]


def reply_digest(text: str) -> str:
    """An assistant reply as clients send it back: without the thinking block (Open WebUI
    strips it) or the identifier block, whitespace collapsed."""
    return text_digest(clean_reply(text))


class Reply(NamedTuple):
    index: int      # in the request's messages
    reply: str      # reply_digest of its text
    users: str      # digest of the user turns before it


def replies_in(messages: Sequence[dict]) -> List[Reply]:
    """Each assistant message, with the digest of the user turns before it."""
    found, turns = [], []
    pending: List[str] = []
    for index, message in enumerate(messages):
        if message["role"] == "user":
            pending.append(message["content"])
        elif message["role"] == "assistant":
            if pending:
                turns.append(text_digest("\n".join(pending)))
                pending = []
            found.append(Reply(index, reply_digest(message["content"]), digest_of_digests(turns)))
    return found


def users_digest(messages: Sequence[dict]) -> Tuple[str, str]:
    """The digests of the user turns of ``messages``, with and without the last, as
    replies_in computes them for a reply that follows them."""
    turns = user_turns(messages)
    if len(turns) == 1:   # a chat's first turn: digest_of_digests of one, without its call and join
        return hashlib.sha256(text_digest(turns[0]).encode()).hexdigest()[:16], NO_TEXT_DIGEST
    digests = list(map(text_digest, turns))   # each turn's once, for both
    before = digests[:-1]   # none when there is no turn: the digest of no text, worked out once
    return digest_of_digests(digests), digest_of_digests(before) if before else NO_TEXT_DIGEST


def new_response_id(conversation_id: str) -> str:
    """A stored response's id holds its conversation's, so the response can be found from it."""
    return f"resp_{conversation_id}{secrets.token_hex(4)}"


def conversation_of_response(response_id: str) -> str:
    conversation_id = str(response_id)[5:37]
    if not str(response_id).startswith("resp_") or not is_conversation_id(conversation_id):
        raise NotFoundError(f"No stored response {response_id!r}.", param="response_id")
    return conversation_id


def new_conversation_id() -> str:
    return secrets.token_urlsafe(CONVERSATION_ID_BYTES)


class RandomIds:
    """Random ids of one form, never given twice: os.urandom read a few kilobytes at a time, the
    pool encoded once and cut into ids. A system call per id makes a busy server wait for the
    interpreter lock after each one; encoding each id on its own, and a lock per id, cost every
    turn a few thousand instructions (a deque's popleft is thread-safe as it is). A forked worker
    draws a pool of its own."""

    POOL_BYTES = 4095   # a multiple of 3: the Base64 of the pool has no padding, each character 6 random bits

    def __init__(self, encode: Callable[[bytes], str], length: int) -> None:
        self._encode, self._length = encode, length   # the pool's text; an id is ``length`` characters of it
        self._ids: "deque[str]" = deque()
        self._pid = -1   # the process the pool was drawn in
        self._lock = threading.Lock()   # one refill at a time

    def __call__(self) -> str:
        if self._pid == os.getpid():
            try:
                return self._ids.popleft()
            except IndexError:   # the pool is used up
                pass
        return self._refill()

    def _refill(self) -> str:
        with self._lock:
            if not self._ids or self._pid != os.getpid():   # not refilled by another thread meanwhile
                text, length = self._encode(os.urandom(self.POOL_BYTES)), self._length
                self._ids = deque([text[start:start + length]
                                   for start in range(0, len(text) - length + 1, length)])
                self._pid = os.getpid()
            return self._ids.popleft()


def _url_safe_text(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode()


class ConversationIds(RandomIds):
    """Conversation ids as new_conversation_id makes them (32 URL-safe characters, 192 random
    bits: the Base64 of CONVERSATION_ID_BYTES), and snapshot ids (``snapshot_id()``,
    SNAPSHOT_ID_BYTES as 12 hex digits), each from a pool of its own."""

    def __init__(self) -> None:
        super().__init__(_url_safe_text, -(-CONVERSATION_ID_BYTES * 4 // 3))   # Base64's length, unpadded
        self.snapshot_id = RandomIds(bytes.hex, SNAPSHOT_ID_BYTES * 2)


def is_conversation_id(text: str) -> bool:
    """Ids are checked against a strict format before any lookup (no path tricks)."""
    return bool(CONVERSATION_ID_PATTERN.match(text or ""))


class _KeyedLocks:
    """One lock per key, made on demand and dropped when its holder leaves. The table maps a
    key to the lock of the one who holds it: a turn makes a lock of its own, already taken, and
    holds the key when dict.setdefault puts that lock in (one step, under the interpreter lock:
    no guard, no count of who waits). A weak dictionary would cost a turn several Python calls
    (its look-up, its reference, its callback when the lock dies)."""

    def __init__(self) -> None:
        self._entries: Dict[str, Any] = {}   # key -> the lock of its holder, taken until the holder leaves

    def __call__(self, key: str) -> "contextlib.AbstractContextManager[None]":
        return _Holding(self, key)


class _Holding:
    """Holds a _KeyedLocks key from enter to exit. A class, not a generator: one is taken per
    turn. Who finds the key held waits for the holder's lock, which is released only after the
    key has left the table, and then tries again; so at most one holds a key, and a waiter
    interrupted while it waits has changed nothing."""

    __slots__ = ("_entries", "_key", "_lock")

    def __init__(self, locks: _KeyedLocks, key: str) -> None:
        self._entries, self._key = locks._entries, key

    def __enter__(self) -> None:
        lock = self._lock = threading.Lock()
        lock.acquire()
        entries, key = self._entries, self._key
        while True:
            holder = entries.setdefault(key, lock)
            if holder is lock:
                return
            holder.acquire()   # until that holder leaves; then the key may be free
            holder.release()

    def __exit__(self, *exc_info: Any) -> None:
        del self._entries[self._key]   # before the release: a waiter that wakes finds the key free
        self._lock.release()


class Store(abc.ABC):
    """What a conversation store does. The stores below implement it, and STORE_TYPES picks
    one by the scheme of ``--store``; an embedding application may give its own subclass.

    The locking rule: a turn enters ``lock(id)``, then calls ``load(id)``, later ``save(id,
    ...)``, then leaves the lock, all on one thread (the request's). The lock must keep turns
    of one conversation apart across every thread and process that shares the store: without
    it two turns at once would lose one's update. It need not be re-entrant (a turn never takes
    the same lock twice), and it may be a plain mutex, since it is released on the thread that
    took it. ``load`` and ``save`` for other ids (``count``, ``expire``, a stored response read
    with no turn) may run at any time on any thread, unlocked. A background response's run
    follows the rule on its own thread, and the records of the Conversations API and of
    background runs are records like the others, under ids of the same form.
    """

    @classmethod
    def from_spec(cls, spec: str, max_age_seconds: Optional[float] = None) -> "Store":
        """The store ``--store spec`` names (a path or a URL whose scheme chose this class)."""
        return cls(spec, max_age_seconds=max_age_seconds)   # type: ignore[call-arg]

    @abc.abstractmethod
    def load(self, conversation_id: str) -> Optional[dict]:
        """The record saved for this id, or None."""

    @abc.abstractmethod
    def save(self, conversation_id: str, record: dict) -> None:
        """Keep ``record`` whole: a crash leaves the old record or the new one, never half."""

    @abc.abstractmethod
    def lock(self, conversation_id: str) -> "contextlib.AbstractContextManager[None]":
        """Hold this conversation for one turn (see the locking rule above)."""

    def expire(self) -> int:
        """Forget conversations unused for the store's ``max_age_seconds``; how many went."""
        return 0

    @abc.abstractmethod
    def count(self) -> int:
        """How many conversations are stored."""

    def ping(self) -> bool:
        """Can the store be used right now? (for /health)"""
        return True

    def describe(self) -> str:
        """Where the conversations are, for the start-up line (never a password)."""
        return type(self).__name__


class MemoryStore(Store):
    """Conversations in a dict; gone on restart. Keeps the ``max_conversations`` most
    recently used, and forgets those unused for ``max_age_seconds``."""

    @classmethod
    def from_spec(cls, spec: str, max_age_seconds: Optional[float] = None) -> "MemoryStore":
        return cls(max_age_seconds=max_age_seconds)

    def __init__(self, max_conversations: int = MEMORY_STORE_MAX_CONVERSATIONS,
                 max_age_seconds: Optional[float] = None):
        self.max_conversations = max_conversations
        self.max_age_seconds = max_age_seconds
        self._records: "OrderedDict[str, Tuple[float, bytes]]" = OrderedDict()
        self._guard = threading.Lock()
        self._locks = _KeyedLocks()
        # save's copy is pickled by one pickler, used under the guard (the interpreter lock keeps
        # threads apart through a pickling anyway): pickle.dumps makes one per call. Fast mode
        # keeps no memo of what it wrote: a record is JSON data, a tree with no cycles, so the
        # memo would only find each string again; without it a copy costs a fifth less.
        self._pickled = io.BytesIO()
        self._pickler = pickle.Pickler(self._pickled, pickle.HIGHEST_PROTOCOL)
        self._pickler.fast = True

    def lock(self, conversation_id: str) -> "contextlib.AbstractContextManager[None]":
        return _Holding(self._locks, conversation_id)   # not through _KeyedLocks.__call__: a call fewer a turn

    def load(self, conversation_id: str) -> Optional[dict]:
        guard = self._guard
        guard.acquire()   # not a with block, as in save
        try:
            self._forget_old()
            saved = self._records.get(conversation_id)
            if saved is not None:
                self._records.move_to_end(conversation_id)
        finally:
            guard.release()
        return pickle.loads(saved[1]) if saved is not None else None   # our own bytes, made by save

    def count(self) -> int:
        return len(self._records)

    def describe(self) -> str:
        return "memory (lost on restart)"

    def save(self, conversation_id: str, record: dict) -> None:
        # A copy, so callers cannot change what is stored: pickled, which for a record of JSON
        # data is several times quicker to make and to read again than JSON (floats above all).
        records, guard, pickled = self._records, self._guard, self._pickled
        guard.acquire()   # not a with block: its special-method calls cost more than what it guards
        try:
            pickled.seek(0)   # emptied first: a pickling that failed may have left a part
            pickled.truncate()
            self._pickler.dump(record)
            records[conversation_id] = (time.time(), pickled.getvalue())
            records.move_to_end(conversation_id)
            while len(records) > self.max_conversations:
                records.popitem(last=False)
        finally:
            guard.release()

    def _forget_old(self) -> None:
        if self.max_age_seconds is None:
            return
        oldest_allowed = time.time() - self.max_age_seconds
        while self._records and next(iter(self._records.values()))[0] < oldest_allowed:
            self._records.popitem(last=False)


class JsonFileStore(Store):
    """One JSON file per conversation in a directory, shared safely by several processes.

    Saving one turn writes one small file, whatever the number of conversations. A write
    goes to a temporary file, is flushed to disk, then atomically replaces the old one, so
    a crash (even kill -9) never leaves a half-written conversation. ``lock(id)`` takes an
    exclusive file lock, so turns of one conversation in several worker processes follow
    each other. ``expire()`` deletes conversations unused for ``max_age_seconds``.

    Across processes, a turn locks one byte of a single lock file, at an offset drawn
    from the conversation's id (POSIX record locks), on a descriptor each process keeps
    open: a lock file per conversation cost three system calls a turn and left a file per
    conversation behind. Within a process, a lock per id keeps threads apart
    (record locks belong to the process, not the thread).
    """

    @classmethod
    def from_spec(cls, spec: str, max_age_seconds: Optional[float] = None) -> "JsonFileStore":
        folder = spec[len("file://"):] if spec.lower().startswith("file://") else spec
        return cls(folder, max_age_seconds=max_age_seconds)

    def __init__(self, directory: Union[str, os.PathLike], max_age_seconds: Optional[float] = None):
        self.directory = os.fspath(directory)
        self.max_age_seconds = max_age_seconds
        self._lock_directory = os.path.join(self.directory, ".locks")
        # Saves are written in a folder of their own, so that finding what a killed process left
        # at start-up looks at a handful of files, not at every conversation.
        self._saving_directory = os.path.join(self.directory, ".saving")
        try:
            os.makedirs(self._lock_directory, exist_ok=True)
            os.makedirs(self._saving_directory, exist_ok=True)
            if not os.access(self.directory, os.W_OK):
                raise PermissionError(13, "Permission denied")
        except OSError as exc:   # a file of that name, a folder it may not write, /proc
            raise ConfigError(f"store {self.directory!r}: cannot keep conversations there "
                              f"({exc.strerror or exc}); give a folder it can create and write, or 'memory'") from None
        self.leftovers_removed = self._remove_leftovers()
        self._thread_locks = _KeyedLocks()   # this process's threads
        self._lock_file: Optional[int] = None   # the open descriptor, in the process that opened it
        self._lock_file_pid = -1
        self._lock_file_guard = threading.Lock()

    TEMPORARY_NAME = re.compile(r"\A[A-Za-z0-9_-]{32}\.json\.(\d+)-\d+\.tmp\Z")   # <id>.json.<pid>-<thread>.tmp

    def _remove_leftovers(self) -> int:
        """Delete the temporary files of saves that never finished (a process killed while it
        wrote); how many. A file is a leftover when the process named in it is gone, or it
        is older than TEMPORARY_FILE_SECONDS (a save takes milliseconds; a pid may be reused):
        the temporary files of live workers sharing the folder are left alone."""
        removed, oldest_allowed = 0, time.time() - TEMPORARY_FILE_SECONDS
        with os.scandir(self._saving_directory) as entries:
            for entry in entries:
                match = self.TEMPORARY_NAME.match(entry.name)
                if not match:
                    continue
                with contextlib.suppress(OSError):
                    if _process_is_gone(int(match.group(1))) or entry.stat().st_mtime < oldest_allowed:
                        os.unlink(entry.path)
                        removed += 1
        return removed

    def _path(self, conversation_id: str) -> str:
        if not is_conversation_id(conversation_id):   # before any file is touched: no "../" tricks
            raise ValueError("not a conversation id")
        return os.path.join(self.directory, conversation_id + ".json")

    def load(self, conversation_id: str) -> Optional[dict]:
        path = self._path(conversation_id)
        try:
            with open(path, encoding="utf-8") as handle:
                return json.load(handle)
        except FileNotFoundError:
            return None
        except ValueError:
            log.warning("conversation %s… is unreadable; starting it afresh", conversation_id[:6])
            return None

    def save(self, conversation_id: str, record: dict) -> None:
        path = self._path(conversation_id)
        temporary = os.path.join(self._saving_directory, f"{conversation_id}.json.{os.getpid()}-"
                                 f"{threading.get_ident()}.tmp")   # unique: one save per thread at a time
        data = json.dumps(record, ensure_ascii=False).encode("utf-8")
        try:
            with open(temporary, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise

    @contextlib.contextmanager
    def lock(self, conversation_id: str) -> Iterator[None]:
        self._path(conversation_id)   # a conversation id, or ValueError
        with self._thread_locks(conversation_id):
            if fcntl is None:   # no file locks: safe within this process only
                yield
                return
            digest = hashlib.blake2b(conversation_id.encode(), digest_size=8).digest()
            offset, descriptor = int.from_bytes(digest, "big") >> 2, self._open_lock_file()   # below 2**62
            while True:
                try:
                    fcntl.lockf(descriptor, fcntl.LOCK_EX, 1, offset)
                    break
                except OSError as exc:
                    # The kernel looks for deadlocks between processes, not threads: two workers
                    # whose threads wait for each other's conversations look like one. It is not.
                    if exc.errno != errno.EDEADLK:
                        raise
                    time.sleep(REDIS_LOCK_POLL_SECONDS)
            try:
                yield
            finally:
                fcntl.lockf(descriptor, fcntl.LOCK_UN, 1, offset)

    def _open_lock_file(self) -> int:
        with self._lock_file_guard:
            if self._lock_file is None or self._lock_file_pid != os.getpid():   # new here, or a forked worker
                path = os.path.join(self._lock_directory, "conversations.lock")
                self._lock_file, self._lock_file_pid = os.open(path, os.O_RDWR | os.O_CREAT, 0o600), os.getpid()
            return self._lock_file

    def count(self) -> int:
        with os.scandir(self.directory) as entries:
            return sum(1 for entry in entries if entry.name.endswith(".json"))

    def describe(self) -> str:
        removed = self.leftovers_removed
        return f"JSON files in {os.path.abspath(self.directory)}" + (
            f" ({removed} temporary file{'s' if removed != 1 else ''} of unfinished saves removed)" if removed else "")

    def expire(self) -> int:
        """Delete conversations not saved for ``max_age_seconds``; how many went."""
        if self.max_age_seconds is None:
            return 0
        oldest_allowed, removed = time.time() - self.max_age_seconds, 0
        with os.scandir(self.directory) as entries:
            for entry in entries:
                if entry.name.endswith((".json", ".tmp")) and entry.stat().st_mtime < oldest_allowed:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)
                        removed += 1
        return removed


def _process_is_gone(pid: int) -> bool:
    """No process has this id (on this machine): os.kill with signal 0 only asks."""
    if pid == os.getpid() or os.name == "nt":   # on Windows os.kill would end the process: go by age there
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError, OSError):
        return False   # someone else's process, or a Windows quirk: keep the file
    return False


class RedisStore(Store):
    """Conversations in Redis (or Valkey), for several server instances on several machines.
    A record is the JSON the other stores write, under one key per conversation,
    with Redis' own expiry refreshed on every save. A turn's lock is a key set with NX and an
    expiry, released only by its owner (compare and delete in one Lua step) and kept alive
    while the turn runs: an instance killed mid-turn holds a conversation for at most
    ``lock_seconds``. Needs ``pip install redis``, imported only here.

    URL: ``redis://[:password@]host:port/db`` or ``rediss://`` for TLS; ``?lock_seconds=N``
    sets the lock's life (default REDIS_LOCK_SECONDS)."""

    KEY = "cozyopenai:conversation:"
    LOCK_KEY = "cozyopenai:lock:"
    RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"
    RENEW = ("if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) "
             "else return 0 end")

    def __init__(self, url: str, max_age_seconds: Optional[float] = None):
        parts = urlsplit(url)
        # Valkey speaks Redis' protocol; the client knows only Redis' schemes.
        parts = parts._replace(scheme={"valkey": "redis", "valkeys": "rediss"}.get(parts.scheme.lower(), parts.scheme))
        try:
            port = parts.port
        except ValueError:
            raise ConfigError(f"store {parts.scheme}://{parts.hostname}: the port is not a number") from None
        self.where = f"{parts.scheme}://{parts.hostname}:{port or 6379}{parts.path or '/0'}"   # no password
        if parts.path.strip("/") and not parts.path.strip("/").isdigit():
            raise ConfigError(f"store {self.where}: the database is a number (redis://host:6379/0), "
                              f"not {parts.path.strip('/')!r}")
        options = dict(item.split("=", 1) for item in parts.query.split("&") if "=" in item)
        try:
            self.lock_seconds = float(options.pop("lock_seconds", REDIS_LOCK_SECONDS))
        except ValueError:
            self.lock_seconds = -1.0
        if not 0 < self.lock_seconds < math.inf:
            raise ConfigError(f"store {self.where}: lock_seconds must be a positive number of seconds")
        self.max_age_seconds = max_age_seconds
        try:
            import redis
        except ImportError:
            raise ConfigError(f"store {self.where}: the Redis store needs the redis package: pip install redis") from None
        self._errors = (redis.RedisError, OSError)
        query = "&".join(f"{name}={value}" for name, value in options.items())
        self._redis = redis.Redis.from_url(parts._replace(query=query).geturl(), socket_timeout=REDIS_TIMEOUT_SECONDS,
                                           socket_connect_timeout=REDIS_TIMEOUT_SECONDS)
        try:
            self._redis.ping()
        except self._errors as exc:
            raise ConfigError(f"store {self.where}: cannot reach Redis ({self._reason(exc)})") from None
        self._release = self._redis.register_script(self.RELEASE)
        self._renew = self._redis.register_script(self.RENEW)
        self._held: Dict[str, str] = {}   # lock key -> token, for the turns running in this process
        self._held_guard = threading.Lock()
        self._keeper: Optional[threading.Thread] = None

    def load(self, conversation_id: str) -> Optional[dict]:
        data = self._call(self._redis.get, self.KEY + conversation_id)
        return json.loads(data) if data is not None else None

    def save(self, conversation_id: str, record: dict) -> None:
        data = json.dumps(record, ensure_ascii=False)
        expiry = int(self.max_age_seconds) if self.max_age_seconds else None
        self._call(self._redis.set, self.KEY + conversation_id, data, ex=expiry)

    @contextlib.contextmanager
    def lock(self, conversation_id: str) -> Iterator[None]:
        key, token = self.LOCK_KEY + conversation_id, secrets.token_hex(16)
        life_ms = int(self.lock_seconds * 1000)
        give_up = time.monotonic() + max(self.lock_seconds, REDIS_LOCK_WAIT_SECONDS)   # as long as a turn may run
        while not self._call(self._redis.set, key, token, nx=True, px=life_ms):
            if time.monotonic() > give_up:   # the holder keeps it alive: it is still working
                raise StoreUnavailable(f"The conversation is busy with another turn in {self.where}; try again.")
            time.sleep(REDIS_LOCK_POLL_SECONDS)
        with self._held_guard:
            self._held[key] = token
            if self._keeper is None or not self._keeper.is_alive():   # one thread renews every lock held here
                self._keeper = threading.Thread(target=self._keep_alive, args=(life_ms,), daemon=True)
                self._keeper.start()
        try:
            yield
        finally:
            with self._held_guard:
                self._held.pop(key, None)
            with contextlib.suppress(*self._errors):   # if Redis is gone, the lock expires by itself
                self._release(keys=[key], args=[token])

    def _keep_alive(self, life_ms: int) -> None:
        """Renew the locks of the turns running here, a third of their life at a time."""
        while True:
            time.sleep(self.lock_seconds / 3)
            with self._held_guard:
                held = list(self._held.items())
                if not held:
                    self._keeper = None
                    return
            for key, token in held:
                with contextlib.suppress(*self._errors):
                    self._renew(keys=[key], args=[token, life_ms])

    def count(self) -> int:
        return self._call(lambda: sum(1 for _ in self._redis.scan_iter(match=self.KEY + "*", count=1000)))

    def ping(self) -> bool:
        try:
            return bool(self._redis.ping())
        except self._errors:
            return False

    def describe(self) -> str:
        return f"Redis at {self.where}"

    def _call(self, method: Callable[..., Any], *arguments: Any, **options: Any) -> Any:
        try:
            return method(*arguments, **options)
        except self._errors as exc:
            raise StoreUnavailable(f"The conversation store ({self.where}) cannot be reached "
                                   f"({self._reason(exc)}); nothing was changed, try again shortly.") from None

    @staticmethod
    def _reason(exc: BaseException) -> str:
        return str(exc).rstrip(".")[:160] or type(exc).__name__   # redis-py names the host, never the password


# open_store's name → class table; a "redis://" or "rediss://" URL picks "redis", a folder "json".
# The stores by the scheme of ``--store``: "memory" and "json" are whole values, a value with no
# scheme is a folder for the JSON store, and Valkey speaks Redis' protocol.
STORE_TYPES: Mapping[str, type] = MappingProxyType({
    "memory": MemoryStore, "json": JsonFileStore, "file": JsonFileStore,
    "redis": RedisStore, "rediss": RedisStore, "valkey": RedisStore, "valkeys": RedisStore})
STORE_SCHEME_PATTERN = re.compile(r"\A([A-Za-z][A-Za-z0-9+.-]*)://")


def open_store(spec: Union[str, os.PathLike, Store], max_age_seconds: Optional[float] = None) -> Store:
    """The store ``spec`` names: "memory", "json" (the default folder), a folder for the JSON
    store, a ``redis://``, ``rediss://`` or ``valkey://`` URL; or a Store given ready. Anything
    else is a ConfigError in one line: an unknown scheme must not become a folder of its name."""
    if not isinstance(spec, (str, os.PathLike)):
        missing = [name for name in ("load", "save", "lock", "count") if not callable(getattr(spec, name, None))]
        if missing or not isinstance(spec, Store):
            raise ConfigError(f"the store {type(spec).__name__} is not a cozyopenai.Store"
                              f"{' (it has no ' + ', '.join(missing) + ')' if missing else ''}: a store must "
                              "load, save, lock and count conversations (subclass cozyopenai.Store)")
        return spec
    name = os.fspath(spec).strip()
    if not name:
        raise ConfigError("--store is empty: give memory, a folder, or a redis:// URL")
    scheme = STORE_SCHEME_PATTERN.match(name)
    if scheme is None:
        chosen = name.lower() if name.lower() in ("memory", "json") else ""
        store_type = STORE_TYPES.get(chosen, JsonFileStore)
        # "json" alone means the JSON store in its default folder, not a folder named "json".
        return store_type.from_spec(DEFAULT_STORE if chosen == "json" else name, max_age_seconds)
    store_type = STORE_TYPES.get(scheme.group(1).lower())
    if store_type is None or scheme.group(1).lower() in ("memory", "json"):
        known = sorted(key for key in STORE_TYPES if key not in ("memory", "json"))
        raise ConfigError(f"--store {scheme.group(1)}://...: unknown scheme; use memory, a folder, or one of "
                          + ", ".join(f"{key}://" for key in known))
    return store_type.from_spec(name, max_age_seconds)


def find_conversation_ids(messages: Sequence[dict]) -> List[str]:
    """Ids in identifier blocks of assistant messages, newest first. Ids in user messages are
    not trusted: Open WebUI quotes assistant replies inside its background-task prompts."""
    found = []
    for message in reversed(messages):
        if message["role"] == "assistant":
            found += [match for match in ID_BLOCK_PATTERN.findall(message["content"]) if is_conversation_id(match)]
    return found


def split_new_messages(messages: Sequence[dict]) -> Tuple[List[dict], str]:
    """(earlier turns, cleaned for context; the user text sent after the last assistant reply)."""
    # Every turn comes here, most with one message: plain loops, and nothing made for a new chat's empty past.
    last_assistant = len(messages) - 1   # the last reply, looked for from the end
    while last_assistant >= 0 and messages[last_assistant]["role"] != "assistant":
        last_assistant -= 1
    earlier = [] if last_assistant < 0 else [
        {"role": m["role"], "content": clean_reply(m["content"]) if m["role"] == "assistant" else m["content"]}
        for m in messages[:last_assistant + 1] if m["role"] in ("user", "assistant")]
    if last_assistant == len(messages) - 2:   # one message after the last reply (most turns): nothing to join
        last = messages[-1]
        return earlier, last["content"].strip() if last["role"] == "user" else ""
    new = "\n".join([m["content"] for m in messages[last_assistant + 1:] if m["role"] == "user"]).strip()
    return earlier, new


def clean_reply(text: str) -> str:
    """An assistant message without its thinking block and identifier block."""
    # Each pattern only where its block may be: most texts have neither, and a search is dearer.
    if "<thinking>" in text:
        text = THINKING_PATTERN.sub("", text)
    if ID_BLOCK_INFO in text:
        text = ID_BLOCK_PATTERN.sub("", text)
    return text.strip()


def clean_own_reply(text: str, block: str) -> str:
    """clean_reply(text), for a reply this server wrote that may end with ``block``, the
    identifier block of a conversation id (id_block). When the text before the block has no
    block or thinking of its own, the pattern would find that block alone and take it away,
    leaving whitespace that strip() removes: the block is cut off instead, without a search
    (a chat's first turn would pay one on every save)."""
    if block and text.endswith(block):
        head = text[:-len(block)]
        if ID_BLOCK_INFO not in head and "<thinking>" not in head:
            return head.strip()
    return clean_reply(text)


def id_block(conversation_id: str) -> str:
    return f"\n\n```{ID_BLOCK_INFO}\n{conversation_id}\n```\n"


def user_turns(history: Sequence[dict]) -> List[str]:
    """The text of each earlier user turn: the user messages between two assistant replies."""
    turns: List[str] = []
    pending: List[str] = []
    for message in history:
        if message["role"] == "user":
            pending.append(message["content"])
        elif message["role"] == "assistant" and pending:
            turns.append("\n".join(pending).strip())
            pending = []
    if pending:   # the last turn, with no reply after it yet
        turns.append("\n".join(pending).strip())
    return turns


####################################################################################
# Reading: the language tables
####################################################################################

INTENTS = ("provide", "correct", "cancel", "skip", "other")


# The sentences a language's table writes, each with its fields (see Language.writes).
WRITTEN_SENTENCES: Mapping[str, Tuple[str, ...]] = MappingProxyType({
    "understood": ("values",), "value": ("label", "value"), "changed": ("changes",),
    "change": ("label", "old", "new"), "still_need": ("labels",), "which": ("label", "values"),
    "several": ("label",), "line_form": (), "not_read": ("labels", "text"), "give_up": ("label", "tries", "line"),
    "and": (), "or": (), "yes": (), "no": ()})


@dataclass(frozen=True)
class Language:
    """One language's words, for the reader. Every field is words separated by spaces,
    written folded (lower case, no accents, no apostrophes: as the reader sees a message),
    except ``months`` (twelve such lists), the phrase fields (phrases separated by commas)
    and ``writes`` (sentences the server writes, as people read them). A field a language
    has no words for stays empty. The reader's logic names no word of any language: it reads
    only these tables, so adding a language is adding one Language to LANGUAGES (its entries
    are checked when the module loads)."""
    code: str
    name: str = ""                      # as a question names it: "English"
    function_words: str = ""            # common words that tell the language of a text apart
    months: Tuple[str, ...] = ()        # January..December: names and abbreviations
    weekdays: str = ""
    seasons: str = ""                   # seasons, holidays and days named by a single word
    time_phrases: str = ""              # times named by several words: "new years eve, semana santa"
    approximations: str = ""            # after a period, part of it: "10 days or so", "une semaine environ"
    season_nouns: str = ""              # a time the words before it name: "the cherry blossom season"
    holiday_words: str = ""             # make a holiday of the time word next to them: "spring break"
    uncertain_times: str = ""           # also ordinary words: a time only capitalised, beside a number
    time_units: str = ""                # "a week", "10 days"
    month_compounds: str = ""           # units written glued after a month: "Maiwoche", "Juliwochenende"
    travel_heads: str = ""              # end a compound that names a kind of trip, no name: "Städtetrip"
    numbers: str = ""                   # number words: "a week", "two nights", "a couple of days"
    qualifiers: str = ""                # "early May", "next week", "el mes que viene"
    relatives: str = ""                 # between a unit and its qualifier: "el mes que viene"
    past: str = ""                      # a time before now: "last year" (a sentence about the past gives no value)
    went: str = ""                      # with a place after them, a trip made before, context: "my mother went to"
    reasons: str = ""                   # open a clause of why, whose values are context: "because of Christmas"
    hearsay: str = ""                   # open a clause of what others said, context too: "they told me it is calm"
    range_links: str = ""               # join the parts of a period: "from 10 to 17 October", "del 3 al 10"
    range_openers: str = ""             # open a range, kept with it: "from 10 to 17", "entre 4 e 11 de maio"
    range_words: str = ""               # between two numbers, a range or a choice: "1500 to 2000", "1500 or 2000"
    and_words: str = ""                 # between two numbers, the ends of a range: "between 1000 and 2000"
    period_leads: str = ""              # lead into a period, not part of it: "in April" is April
    articles: str = ""                  # between a place word and a name: "in the Highlands"
    place_leads: str = ""               # a capitalised name after them is a place: "a trip to Lisbon"
    motions: str = ""                   # going somewhere, before a place word: "going to lyon", "wollen nach"
    stays: str = ""                     # being somewhere already: "I'm in London"
    corrections: str = ""               # fillers of a correction: "Rome, sorry, Florence"
    negations: str = ""                 # rule out what follows in the clause: "not Paris"
    wishes: str = ""                    # a negated wish reaches further: "I don't want to go in July"
    excess: str = ""                    # a choice after them is a complaint, not a wish: "too busy", "zu voll"
    except_openers: str = ""            # with except_words: "anywhere but Paris"
    except_words: str = ""
    contrasts: str = ""                 # end a negation's reach, and a later value replaces: "not Paris but Lyon"
    preferences: str = ""               # choose the value beside them: "Florence instead", "plutot Cannes"
    changes: str = ""                   # a choice after them changes a value given before: "make it packed"
    alternatives: str = ""              # offer values side by side: "Sydney or Melbourne"
    hedges: str = ""                    # leave the clause's value open: "somewhere in Italy, maybe", "tal vez"
    conclusions: str = ""               # open a clause of what is decided: "so we're heading to X", "así que Berlín"
    name_joiners: str = ""              # inside a name: "Rio de Janeiro", "Frankfurt am Main"
    name_starts: str = ""               # start a place's name, written in lower case too: "new york", "san jose"
    name_ends: str = ""                 # end a capitalised name, though a word of their own: "Salt Lake City"
    confirmations: str = ""             # a clause of a name and these only names a value: "Florence it is"
    non_answers: str = ""               # talk about the chat, not a value: "Add Details", "no idea", "Great."
    cancels: str = ""                   # words of stopping, for the LLM's cancel intent
    cancel_phrases: str = ""            # a whole message of one of these cancels: "start over"
    rerun_phrases: str = ""             # "again": run once more with the same values
    yes: str = ""
    no: str = ""
    sentence_starts: str = ""           # a reply opening with one is a sentence, not a value
    greetings: str = ""                 # never a name, though capitalised alone: "Bonjour, ..."
    phrase_starts: str = ""             # after a label, show it is talked about: "a destination with beaches"
    copulas: str = ""                   # between a label and its value: "destination is Rome"
    label_links: str = ""               # between a label and its number, besides copulas: "a budget of 2000"
    common_words: str = ""              # too loose to name an input, in a label: "number", "value"
    thousands: str = ""                 # after a number, times a thousand: "3 mil reais", "2 grand"
    cardinals: str = ""                 # number words as "word:value": "twenty:20 hundred:100"; glued
                                        # ("zweitausendfunfhundert") or hyphenated, they add and multiply
    ordinals: str = ""                  # ordinal words as "word:value", up to twelfth: "third:3" ("the third month")
    currency_words: str = ""
    rate_words: str = ""                # an amount before these and a unit is a rate: "50 euros a night"
    limits: str = ""                    # beside a bare number, make it the amount: "1000 max", "1600 in totale"
    amount_leads: str = ""              # before a bare number of AMOUNT_LEAD_MIN or more, bring it: "con 1500"
    rate_units: str = ""                # besides time units: "per person"
    kind_words: Mapping[str, str] = field(default_factory=dict)   # the kind of an input, from its words
    # Not read: the sentences the server writes in this language (its questions without an LLM),
    # as format strings, each with the fields WRITTEN_SENTENCES gives it. Empty: replies are English.
    writes: Mapping[str, str] = field(default_factory=dict)


ENGLISH = Language(
    code="en",
    name="English",
    function_words="i you your we my me it the a an and or is are was be do does have what when where which how "
                   "who would could should like want please tell for with of to about this that trip travel go "
                   "much long",
    excess="too overly",
    past="last ago previous", went="went visited",
    greetings="hi hello hey dear sir madam",
    wishes="want wanna like wish would do", changes="make change changed switch set turn go raise increase bump meant",
    approximations="or so, ish, more or less, roughly",
    months=("january jan", "february feb", "march mar", "april apr", "may", "june jun", "july jul",
            "august aug", "september sep sept", "october oct", "november nov", "december dec"),
    weekdays="monday tuesday wednesday thursday friday saturday sunday",
    seasons="spring summer autumn fall winter season easter christmas thanksgiving pentecost today tomorrow "
            "tonight weekend week-end weekends",
    time_phrases="new year, new years, new years eve, new years day, memorial day, labor day, labour day, "
                 "independence day, bank holiday",
    season_nouns="season",
    holiday_words="break breaks holiday holidays vacation eve",
    uncertain_times="may mar jan march sun sat wed fall",
    time_units="day days night nights week weeks wk wks month months fortnight year years",
    numbers="a an one two three four five six seven eight nine ten eleven twelve fourteen fifteen couple few "
            "several",
    qualifiers="early mid middle late end sometime beginning start first second third fourth last next this coming "
               "following long whole entire half now",
    range_openers="from between",
    range_links="to until till through thru and from of in on at the for during over after before around between",
    range_words="to or", and_words="and",
    period_leads="in on at for from during over",
    articles="the",
    place_leads="to in into for visit visiting see explore discover",
    motions="go goes going travel travelling traveling fly flying trip head heading getaway holiday vacation honeymoon",
    stays="im am live lives living based stay staying home",
    corrections="sorry pardon wait actually oops ah oh correction",
    hearsay="heard told said says",
    reasons="because cause cuz coz",
    negations="not no never without except excluding nor dont doesnt didnt wont cant isnt arent none zero",
    except_openers="anywhere anything everywhere everything all any somewhere",
    except_words="but",
    contrasts="but rather instead",
    preferences="rather instead prefer finally",
    alternatives="or",
    conclusions="so, so yeah, therefore",
    hedges="maybe, perhaps, possibly, somewhere, probably",
    name_joiners="upon on", name_starts="new san santa saint st port fort mount lake", name_ends="city town",
    confirmations="it is its please then this that time now decided ok okay",
    non_answers="add details detail more less concise shorter longer tell me explain elaborate continue again "
                "regenerate retry try hmm hm um uh er let think about it maybe not sure unsure know dunno idk no "
                "idea whatever anything anywhere somewhere something wait please thanks thank you ok okay yes what "
                "why how which who great perfect cool awesome super fine sure good lovely excellent amazing wonderful "
                "lol haha pls plz",
    cancels="stop cancel abort reset forget nevermind restart",
    cancel_phrases="stop, cancel, abort, reset, start over, start again, restart, never mind, nevermind",
    rerun_phrases="again, retry, rerun, re-run, once more, try it",
    yes="yes yeah yep sure true",
    no="no nope false",
    sentence_starts="i im id ill ive we were wed lets let my our it its please can could would what how why hi "
                    "hello hey thanks ok okay actually no nope yes sorry well so make change maybe perhaps rather "
                    "instead but and also then",
    phrase_starts="a an the with for of in to that which and or is are was will yet not still any some you "
                  "should would could as doesn don isn no none nothing never really tbd unknown undecided",
    copulas="is are", label_links="of now to", thousands="thousand grand",
    common_words="whether with that this from they their them user users there what when which will would should "
                 "have does into also only more than some very your about name number value true false",
    currency_words="dollar dollars bucks pound pounds quid euro euros",
    ordinals="first:1 second:2 third:3 fourth:4 fifth:5 sixth:6 seventh:7 eighth:8 ninth:9 tenth:10 "
             "eleventh:11 twelfth:12",
    cardinals="zero:0 one:1 two:2 three:3 four:4 five:5 six:6 seven:7 eight:8 nine:9 ten:10 eleven:11 twelve:12 "
              "thirteen:13 fourteen:14 fifteen:15 sixteen:16 seventeen:17 eighteen:18 nineteen:19 twenty:20 "
              "thirty:30 forty:40 fifty:50 sixty:60 seventy:70 eighty:80 ninety:90 hundred:100 thousand:1000 "
              "grand:1000",
    limits="max maximum tops total", amount_leads="with",
    rate_words="a an per each every",
    rate_units="person persons people head pax",
    kind_words={"email": "email e-mail", "url": "url urls link website webpage",
                "date": "date dates when period day days", "place": "where destination city town place country "
                "region location", "money": "budget price cost money amount spend spending fee salary currency",
                "year": "year years", "month": "month"},
    writes={
        "understood": "Got it: {values}.", "value": "{label} {value}", "changed": "Changed {changes}.",
        "change": "the {label} from {old} to {new}", "still_need": "I still need the {labels}.",
        "which": "Which {label} do you mean: {values}?",
        "several": 'You can also give several at once, one per line, like "{label}: ...".',
        "line_form": "You can also write it like this, one per line:",
        "not_read": 'I could not read the {labels} from "{text}". ',
        "give_up": ('I asked for the {label} {tries} times without an answer I could use. You can give it as '
                    '"{line}: ...", or say "start over" to begin again.'),
        "and": "and", "or": "or", "yes": "yes", "no": "no"},
)

FRENCH = Language(
    code="fr",
    name="French",
    function_words="je tu vous votre vos nous mon ma mes le les un une des du et ou est sont etes quel quelle "
                   "quels quand ou comment combien voudrais voulez souhaitez aimeriez pour avec dans sur voyage "
                   "partir aller pas",
    excess="trop",
    past="dernier derniere passe passee", went="allee allees",
    greetings="bonjour salut bonsoir coucou madame monsieur messieurs",
    wishes="veux voudrais veut voulons aimerais voulais", changes="mets passe change rends faisons monte augmente",
    approximations="environ, a peu pres, plus ou moins",
    months=("janvier", "fevrier", "mars", "avril", "mai", "juin", "juillet", "aout", "septembre", "octobre",
            "novembre", "decembre"),
    weekdays="lundi mardi mercredi jeudi vendredi samedi dimanche",
    seasons="printemps ete automne hiver saison paques noel pentecote reveillon toussaint aujourdhui demain "
            "week-end",
    time_phrases="nouvel an, jour de lan, saint sylvestre",
    season_nouns="saison",
    holiday_words="vacances sainte fetes",
    time_units="jour jours journee nuit nuits semaine semaines mois quinzaine an ans annee annees",
    numbers="un une deux trois quatre cinq six sept huit neuf dix quinze quelques dizaine douzaine",
    qualifiers="debut mi milieu fin premier premiere premiers premieres deuxieme deuxiemes troisieme dernier "
               "derniere derniers dernieres prochain prochaine prochains prochaines ce cet cette ces vient tout",
    relatives="qui",
    range_openers="du de entre",
    range_links="du des au aux jusqu jusquau et le la les l d de en dans pour pendant qui apres avant vers entre",
    range_words="a ou", and_words="et",
    period_leads="du au aux jusqu de d en dans pour pendant",
    articles="la le les l",
    place_leads="a au aux en pour vers visiter voir decouvrir",
    motions="aller vais va allons partir pars partons voyage voyager voler sejour escapade vacances",
    stays="suis habite vis",
    corrections="pardon oups attends correction",
    hearsay="dit disent entendu",
    reasons="parce car",
    negations="pas non sans sauf jamais ni aucun aucune",
    contrasts="mais plutot",
    preferences="plutot prefere prefererais finalement",
    alternatives="ou",
    conclusions="donc, donc voila, alors",
    hedges="peut-etre, peutetre",
    name_joiners="de la le sur en", name_starts="saint sainte",
    confirmations="cest alors svp decide cette fois sera ce",
    non_answers="plus details detaille concis court explique encore peut etre sais pas idee parfait super genial "
                "bien excellent top stp svp",
    cancels="annuler annule oublie oublier arrete",
    cancel_phrases="annuler, recommencer, on recommence",
    rerun_phrases="encore",
    yes="oui vrai",
    no="non faux",
    sentence_starts="je j nous moi non oui plutot",
    copulas="est sont", label_links="de maintenant desormais", thousands="mille",
    currency_words="euro euros franc francs balles",
    ordinals="premier:1 premiere:1 deuxieme:2 second:2 seconde:2 troisieme:3 quatrieme:4 cinquieme:5 sixieme:6 "
             "septieme:7 huitieme:8 neuvieme:9 dixieme:10 onzieme:11 douzieme:12",
    cardinals="zero:0 un:1 une:1 deux:2 trois:3 quatre:4 cinq:5 six:6 sept:7 huit:8 neuf:9 dix:10 onze:11 "
              "douze:12 treize:13 quatorze:14 quinze:15 seize:16 vingt:20 vingts:20 trente:30 quarante:40 "
              "cinquante:50 soixante:60 septante:70 huitante:80 octante:80 nonante:90 quatre-vingt:80 "
              "quatre-vingts:80 cent:100 cents:100 mille:1000",
    limits="max maximum total", amount_leads="avec",
    rate_words="par la le",
    rate_units="personne personnes",
    kind_words={"year": "an ans annee annees", "month": "mois", "place": "destination ville lieu pays", "date": "quand dates periode",
                "money": "budget prix"},
    writes={
        "understood": "C'est noté : {values}.", "value": "{label} {value}", "changed": "Modifié : {changes}.",
        "change": "{label} de {old} à {new}", "still_need": "Il me manque encore : {labels}.",
        "which": "Pour « {label} », vous voulez dire {values} ?",
        "several": "Vous pouvez aussi en donner plusieurs à la fois, une par ligne, comme « {label} : ... ».",
        "line_form": "Vous pouvez aussi l'écrire ainsi, une valeur par ligne :",
        "not_read": "Je n'ai rien pu lire pour {labels} dans « {text} ». ",
        "give_up": ("J'ai demandé « {label} » {tries} fois sans réponse que je puisse utiliser. Vous pouvez "
                    "l'écrire « {line} : ... », ou dire « recommencer » pour reprendre depuis le début."),
        "and": "et", "or": "ou", "yes": "oui", "no": "non"},
)

GERMAN = Language(
    code="de",
    name="German",
    function_words="ich du sie ihr ihre wir mein meine der die das den dem ein eine einen und oder ist sind wann "
                   "wo wie welche welcher wohin mochte mochten wollen bitte fur mit nach reise fahren urlaub "
                   "nicht auch gerade",
    excess="zu so",
    past="letztes letzten letzte vergangenen vergangenes vorigen voriges", went="gewesen besucht gefahren geflogen",
    greetings="hallo servus moin geehrte geehrter herren damen",
    wishes="will mochte mochten wollen moechte", changes="mach mache machen stell andere erhohe erhoh meinte",
    approximations="oder so, ungefahr, etwa",
    months=("januar janner", "februar", "marz maerz", "april", "mai", "juni", "juli", "august", "september",
            "oktober", "november", "dezember"),
    weekdays="montag dienstag mittwoch donnerstag freitag samstag sonntag",
    seasons="fruhling fruehling sommer herbst winter ostern weihnachten pfingsten silvester fruhjahr heute "
            "morgen wochenende",
    season_nouns="saison",
    month_compounds="woche wochen wochenende halfte",
    travel_heads="trip reise urlaub ausflug ferien fahrt",
    holiday_words="ferien urlaub",
    uncertain_times="morgen",
    time_units="tag tage tagen nacht nachte woche wochen monat monate jahr jahre",
    numbers="ein eine einen zwei drei vier funf sechs sieben acht neun zehn vierzehn paar einige dutzend",
    qualifiers="anfang mitte ende erste ersten zweite zweiten dritte letzte letzten letztes nachste nachsten nachstes "
               "nachster kommende kommenden diese diesen dieses lang lange langes langen verlangerte verlangertes "
               "verlangerten ganz ganzen ganze",
    range_openers="von vom zwischen ab",
    range_links="vom von bis zum zur und im am in der die das den des dem fur wahrend uber ubers um gegen vor zwischen",
    range_words="bis oder", and_words="und",
    period_leads="vom von bis zum zur im am fur wahrend uber ubers",
    articles="der die das den",
    place_leads="nach in ins an fur besuchen sehen entdecken",
    motions="fahren fahre fahrt fliegen fliege reise reisen urlaub ausflug will wollen mochte mochten moechte",
    stays="wohne wohnen lebe bin hause",
    corrections="entschuldigung ups warte eigentlich moment korrektur",
    hearsay="gesagt sagt gehort",
    reasons="weil wegen",
    negations="nicht kein keine keinen keinem ohne ausser statt anstatt nie",
    contrasts="aber sondern lieber",
    preferences="lieber bevorzuge",
    alternatives="oder",
    conclusions="also, deshalb, daher",
    hedges="vielleicht, eventuell, irgendwo",
    name_joiners="am an", name_starts="sankt bad", name_ends="stadt",
    confirmations="bitte dann entschieden diesmal",
    non_answers="mehr kurzer erklare weiter vielleicht weiss nicht keine ahnung super toll prima perfekt gut klasse",
    cancels="abbrechen vergiss vergessen stopp",
    cancel_phrases="abbrechen, von vorne, nochmal von vorne",
    rerun_phrases="nochmal, noch einmal",
    yes="ja wahr",
    no="nein nee falsch",
    sentence_starts="ich wir mein meine nein ja lieber",
    copulas="ist sind", label_links="von jetzt nun auf", thousands="tausend",
    currency_words="franken pfund",
    ordinals="erste:1 ersten:1 zweite:2 zweiten:2 dritte:3 dritten:3 vierte:4 vierten:4 funfte:5 funften:5 "
             "sechste:6 sechsten:6 siebte:7 siebten:7 achte:8 achten:8 neunte:9 neunten:9 zehnte:10 zehnten:10 "
             "elfte:11 elften:11 zwolfte:12 zwolften:12",
    cardinals="null:0 ein:1 eins:1 eine:1 zwei:2 drei:3 vier:4 funf:5 fuenf:5 sechs:6 sieben:7 acht:8 neun:9 "
              "zehn:10 elf:11 zwolf:12 zwoelf:12 dreizehn:13 vierzehn:14 funfzehn:15 sechzehn:16 siebzehn:17 "
              "achtzehn:18 neunzehn:19 zwanzig:20 dreissig:30 vierzig:40 funfzig:50 sechzig:60 siebzig:70 "
              "achtzig:80 neunzig:90 hundert:100 tausend:1000",
    limits="max maximal hochstens insgesamt", amount_leads="mit",
    rate_words="pro je",
    rate_units="person personen",
    kind_words={"year": "jahr jahre jahren", "month": "monat", "place": "wohin ziel reiseziel stadt ort",
                "date": "wann zeitraum datum reisezeit",
                "money": "budget preis"},
    writes={
        "understood": "Verstanden: {values}.", "value": "{label} {value}", "changed": "Geändert: {changes}.",
        "change": "{label} von {old} auf {new}", "still_need": "Mir fehlt noch: {labels}.",
        "which": "{label}: Meinen Sie {values}?",
        "several": "Sie können auch mehrere auf einmal angeben, eine pro Zeile, etwa „{label}: ...“.",
        "line_form": "Sie können es auch so schreiben, eine Angabe pro Zeile:",
        "not_read": "Ich konnte aus „{text}“ nichts für {labels} lesen. ",
        "give_up": ("Ich habe {tries}-mal nach „{label}“ gefragt, ohne eine Antwort, die ich verwenden kann. Sie "
                    "können es als „{line}: ...“ angeben oder „von vorne“ sagen, um neu zu beginnen."),
        "and": "und", "or": "oder", "yes": "ja", "no": "nein"},
)

SPANISH = Language(
    code="es",
    name="Spanish",
    function_words="yo tu usted su sus nosotros mi mis el los las un una unos y o es son esta cual cuales cuando "
                   "donde como cuanto quiero quisiera gustaria para con por viaje viajar ir fechas presupuesto",
    excess="demasiado demasiada",
    past="pasado pasada anterior", went="fui fue fuimos fueron estuve estuvo estuvimos",
    greetings="hola buenas estimado estimada estimados senor senora",
    wishes="quiero quisiera queremos queria", changes="hazlo haz pon cambia ponlo hagamos sube subelo aumenta",
    approximations="mas o menos, o asi, aproximadamente",
    months=("enero", "febrero", "marzo", "abril", "mayo", "junio", "julio", "agosto", "septiembre setiembre",
            "octubre", "noviembre", "diciembre"),
    weekdays="lunes martes miercoles jueves viernes sabado domingo",
    seasons="primavera verano otono invierno temporada pascua navidad nochevieja hoy manana",
    time_phrases="semana santa, ano nuevo, fin de ano, fin de semana",
    season_nouns="temporada",
    holiday_words="vacaciones puente santa santo fiestas",
    time_units="dia dias noche noches semana semanas finde findes mes meses quincena ano anos",
    numbers="un una uno unos unas dos tres cuatro cinco seis siete ocho nueve diez quince decena docena",
    qualifiers="principios mediados finales primera primer segunda segundo tercera ultima ultimo proximo "
               "proxima este esta largo larga viene primeras primeros ultimas ultimos todo",
    relatives="que",
    range_openers="del de desde entre",
    range_links="al del que desde hasta y el los las a de en despues antes hacia entre",
    range_words="a al y o", and_words="y",
    period_leads="del desde hasta a en de",
    articles="el los las la",
    place_leads="a al en para por hacia visitar ver conocer descubrir",
    motions="ir voy vamos viajar viaje volar escapada vacaciones",
    stays="vivo vive estoy casa",
    corrections="bueno perdon perdona ups espera quise decir correccion",
    hearsay="dijeron dicen dijo oido",
    reasons="porque causa",
    negations="sin excepto salvo menos nunca nada ningun ninguno ninguna",
    contrasts="pero sino mejor",
    preferences="mejor prefiero finalmente",
    alternatives="o u",
    conclusions="asi que, entonces, pues",
    hedges="quizas, quiza, tal vez",
    name_joiners="de del la y", name_starts="san santa santo ciudad puerto",
    confirmations="porfa decidido entonces sera",
    non_answers="mas detalles conciso explica quizas se ni idea perfecto genial vale bien estupendo porfa",
    cancels="cancela cancelar olvida olvidalo",
    cancel_phrases="cancelar, cancela, empezar de nuevo, empecemos de nuevo",
    rerun_phrases="otra vez, de nuevo",
    yes="si verdadero",
    no="no falso",
    sentence_starts="yo quiero queremos mi mejor",
    copulas="es son", label_links="de ahora", thousands="mil",
    currency_words="peso pesos dolar dolares pavos libra libras",
    ordinals="primer:1 primero:1 primera:1 segundo:2 segunda:2 tercer:3 tercero:3 tercera:3 cuarto:4 cuarta:4 "
             "quinto:5 quinta:5 sexto:6 sexta:6 septimo:7 septima:7 octavo:8 octava:8 noveno:9 novena:9 "
             "decimo:10 decima:10 undecimo:11 duodecimo:12",
    cardinals="cero:0 un:1 uno:1 una:1 dos:2 tres:3 cuatro:4 cinco:5 seis:6 siete:7 ocho:8 nueve:9 diez:10 "
              "once:11 doce:12 trece:13 catorce:14 quince:15 dieciseis:16 diecisiete:17 dieciocho:18 "
              "diecinueve:19 veinte:20 veinti:20 treinta:30 cuarenta:40 cincuenta:50 sesenta:60 setenta:70 "
              "ochenta:80 noventa:90 cien:100 ciento:100 doscientos:200 doscientas:200 trescientos:300 "
              "cuatrocientos:400 quinientos:500 seiscientos:600 setecientos:700 ochocientos:800 "
              "novecientos:900 mil:1000",
    limits="max maximo total", amount_leads="con",
    rate_words="por la el",
    rate_units="persona personas",
    kind_words={"year": "ano anos", "month": "mes", "place": "destino ciudad lugar", "date": "cuando fechas fecha",
                "money": "presupuesto precio"},
    writes={
        "understood": "Entendido: {values}.", "value": "{label} {value}", "changed": "Cambiado: {changes}.",
        "change": "{label} de {old} a {new}", "still_need": "Todavía necesito: {labels}.",
        "which": "Para «{label}», ¿se refiere a {values}?",
        "several": "También puede dar varios a la vez, uno por línea, como «{label}: ...».",
        "line_form": "También puede escribirlo así, uno por línea:",
        "not_read": "No pude leer nada para {labels} en «{text}». ",
        "give_up": ("He preguntado por «{label}» {tries} veces sin una respuesta que pueda usar. Puede darlo "
                    "como «{line}: ...», o decir «empezar de nuevo» para volver a empezar."),
        "and": "y", "or": "o", "yes": "sí", "no": "no"},
)

ITALIAN = Language(
    code="it",
    name="Italian",
    function_words="io tu lei voi noi mio mia il lo gli un una uno e o sono che quale quali quando dove come "
                   "quanto voglio vorrei piacerebbe per con di del della viaggio andare partire date",
    excess="troppo troppa",
    past="scorso scorsa", went="andato andata andati ando stato stata stati",
    greetings="ciao salve buongiorno buonasera gentile egregio signore signora",
    wishes="voglio vorrei vogliamo volevo", changes="fallo fai metti cambia rendilo facciamo alza alzalo aumenta intendevo",
    approximations="piu o meno, circa, o giu di li",
    months=("gennaio", "febbraio", "marzo", "aprile", "maggio", "giugno", "luglio", "agosto", "settembre",
            "ottobre", "novembre", "dicembre"),
    weekdays="lunedi martedi mercoledi giovedi venerdi sabato domenica",
    seasons="primavera estate autunno inverno stagione pasqua natale capodanno ferragosto oggi domani",
    time_phrases="fine settimana",
    season_nouns="stagione",
    holiday_words="vacanze ponte santo feste",
    time_units="giorno giorni notte notti settimana settimane mese mesi anno anni",
    numbers="un uno una due tre quattro cinque sei sette otto nove dieci quindici qualche alcuni alcune decina "
            "dozzina",
    qualifiers="inizio meta fine prima primo seconda secondo terza prossimo prossima questo questa lungo "
               "lunga viene prime primi ultime ultimi tutto",
    relatives="che",
    range_openers="dal dai da tra fra",
    range_links="al dal dai fino e il lo di del nel nella per durante a dopo verso tra fra",
    range_words="a o oppure", and_words="e",
    period_leads="a ad dal dai fino nel nella per durante di",
    articles="il lo la gli",
    place_leads="a ad in nel nella nell alla allo all per verso visitare vedere scoprire",
    motions="andare vado andiamo viaggio viaggiare volare partire vacanza gita",
    stays="sono abito casa",
    corrections="anzi scusa scusate ops aspetta realta correzione",
    hearsay="detto dicono sentito",
    reasons="perche causa",
    negations="senza tranne eccetto mai ne niente nessun nessuno nessuna",
    contrasts="ma piuttosto invece",
    preferences="meglio piuttosto invece preferisco finalmente",
    alternatives="o oppure",
    conclusions="quindi, allora, dunque",
    hedges="forse, magari",
    name_joiners="di da", name_starts="san santa santo",
    confirmations="allora grazie deciso sara",
    non_answers="piu dettagli spiega forse so non idea perfetto ottimo bene benissimo fantastico",
    cancels="annulla lascia dimentica",
    cancel_phrases="annulla, ricominciare, ricominciamo",
    rerun_phrases="di nuovo, ancora",
    yes="si vero",
    no="no falso",
    sentence_starts="io vorrei mi meglio",
    copulas="e sono", label_links="di ora adesso", thousands="mila mille",
    currency_words="dollari sterlina sterline",
    ordinals="primo:1 prima:1 secondo:2 seconda:2 terzo:3 terza:3 quarto:4 quarta:4 quinto:5 quinta:5 sesto:6 "
             "sesta:6 settimo:7 settima:7 ottavo:8 ottava:8 nono:9 nona:9 decimo:10 decima:10 undicesimo:11 "
             "dodicesimo:12",
    cardinals="zero:0 uno:1 una:1 un:1 due:2 tre:3 quattro:4 cinque:5 sei:6 sette:7 otto:8 nove:9 dieci:10 "
              "undici:11 dodici:12 tredici:13 quattordici:14 quindici:15 sedici:16 diciassette:17 diciotto:18 "
              "diciannove:19 venti:20 vent:20 trenta:30 trent:30 quaranta:40 quarant:40 cinquanta:50 "
              "cinquant:50 sessanta:60 sessant:60 settanta:70 settant:70 ottanta:80 ottant:80 novanta:90 "
              "novant:90 cento:100 mille:1000 mila:1000",
    limits="max massimo totale", amount_leads="con",
    rate_words="a al per",
    rate_units="persona persone testa",
    kind_words={"year": "anno anni", "month": "mese", "place": "destinazione meta citta luogo",
                "date": "quando date periodo",
                "money": "budget prezzo"},
    writes={
        "understood": "Ricevuto: {values}.", "value": "{label} {value}", "changed": "Modificato: {changes}.",
        "change": "{label} da {old} a {new}", "still_need": "Mi serve ancora: {labels}.",
        "which": "Per «{label}», intende {values}?",
        "several": "Può anche darne diversi insieme, uno per riga, come «{label}: ...».",
        "line_form": "Può anche scriverlo così, uno per riga:",
        "not_read": "Non sono riuscito a leggere nulla per {labels} da «{text}». ",
        "give_up": ("Ho chiesto «{label}» {tries} volte senza una risposta che io possa usare. Può scriverlo "
                    "come «{line}: ...», oppure dire «ricominciamo» per ripartire da capo."),
        "and": "e", "or": "o", "yes": "sì", "no": "no"},
)

PORTUGUESE = Language(
    code="pt",
    name="Portuguese",
    function_words="eu voce vos seu sua nos meu minha o os as um uma uns e ou sao esta qual quais quando onde "
                   "como quanto quero gostaria queria para com do da viagem viajar ir datas orcamento nao",
    excess="demais demasiado",
    past="passado passada", went="foi fui fomos foram estive esteve estivemos estiveram",
    greetings="ola oi prezado prezada prezados senhor senhora",
    wishes="quero queria queremos", changes="faz faca coloca muda deixa fazemos sobe aumenta",
    approximations="mais ou menos, por ai, aproximadamente",
    months=("janeiro", "fevereiro", "marco", "abril", "maio", "junho", "julho", "agosto", "setembro",
            "outubro", "novembro", "dezembro"),
    weekdays="segunda terca quarta quinta sexta sabado domingo",
    seasons="primavera verao outono inverno temporada pascoa natal reveillon carnaval hoje amanha",
    time_phrases="ano novo, semana santa, fim de semana",
    season_nouns="temporada",
    holiday_words="ferias feriado festas",
    time_units="dia dias noite noites semana semanas mes meses quinzena ano anos",
    numbers="um uma uns umas dois duas tres quatro cinco seis sete oito nove dez quinze alguns algumas dezena duzia",
    qualifiers="inicio meados fim final primeira primeiro segunda segundo terceira ultima ultimo proximo "
               "proxima este esta longo longa vem primeiras primeiros ultimas ultimos todo",
    relatives="que",
    range_openers="de do da entre desde",
    range_links="de do da dos das a ao ate e em no na depois antes entre",
    range_words="a ate ou", and_words="e",
    period_leads="em no na de do da a ate",
    articles="o os as",
    place_leads="a ao aos para pra pro em conhecer visitar ver descobrir",
    motions="ir vou vamos viajar viagem voar ferias passeio",
    stays="moro vivo estou casa",
    corrections="desculpa desculpe perdao ops espera quis dizer afinal pensando correcao",
    hearsay="disseram dizem disse ouvi",
    reasons="porque causa",
    negations="nao nem sem nunca exceto nenhum nenhuma",
    contrasts="mas prefiro antes",
    preferences="prefiro antes melhor finalmente",
    alternatives="ou",
    conclusions="entao, portanto, por isso",
    hedges="talvez, quica",
    name_joiners="de do da dos das", name_starts="sao santa santo nova novo",
    confirmations="entao decidido vai ser",
    non_answers="mais detalhes explica talvez sei nao ideia perfeito otimo beleza legal pfv",
    cancels="cancela cancelar esquece",
    cancel_phrases="cancelar, cancela, recomecar, vamos recomecar, comecar de novo",
    rerun_phrases="de novo, outra vez",
    yes="sim verdadeiro",
    no="nao falso",
    sentence_starts="eu quero queremos meu minha prefiro",
    copulas="e sao", label_links="de agora para", thousands="mil",
    currency_words="real reais libra libras",
    ordinals="primeiro:1 primeira:1 segundo:2 segunda:2 terceiro:3 terceira:3 quarto:4 quarta:4 quinto:5 "
             "quinta:5 sexto:6 sexta:6 setimo:7 setima:7 oitavo:8 oitava:8 nono:9 nona:9 decimo:10 decima:10",
    cardinals="zero:0 um:1 uma:1 dois:2 duas:2 tres:3 quatro:4 cinco:5 seis:6 sete:7 oito:8 nove:9 dez:10 "
              "onze:11 doze:12 treze:13 catorze:14 quatorze:14 quinze:15 dezesseis:16 dezasseis:16 "
              "dezessete:17 dezassete:17 dezoito:18 dezenove:19 dezanove:19 vinte:20 trinta:30 quarenta:40 "
              "cinquenta:50 sessenta:60 setenta:70 oitenta:80 noventa:90 cem:100 cento:100 duzentos:200 "
              "duzentas:200 trezentos:300 quatrocentos:400 quinhentos:500 seiscentos:600 setecentos:700 "
              "oitocentos:800 novecentos:900 mil:1000",
    limits="max maximo total", amount_leads="com",
    rate_words="por a o",
    rate_units="pessoa pessoas",
    kind_words={"year": "ano anos", "month": "mes", "place": "destino cidade lugar", "date": "quando datas",
                "money": "orcamento preco"},
    writes={
        "understood": "Entendido: {values}.", "value": "{label} {value}", "changed": "Alterado: {changes}.",
        "change": "{label} de {old} para {new}", "still_need": "Ainda preciso de: {labels}.",
        "which": "Para «{label}», quer dizer {values}?",
        "several": "Também pode dar vários de uma vez, um por linha, como «{label}: ...».",
        "line_form": "Também pode escrevê-lo assim, um por linha:",
        "not_read": "Não consegui ler nada para {labels} em «{text}». ",
        "give_up": ("Perguntei por «{label}» {tries} vezes sem uma resposta que eu possa usar. Pode dá-lo como "
                    "«{line}: ...», ou dizer «recomeçar» para começar de novo."),
        "and": "e", "or": "ou", "yes": "sim", "no": "não"},
)

LANGUAGES: Mapping[str, Language] = MappingProxyType({
    language.code: language for language in (ENGLISH, FRENCH, GERMAN, SPANISH, ITALIAN, PORTUGUESE)})
# Written the same in every language: symbols of yes and no, currency codes and signs.
SYMBOL_YES, SYMBOL_NO = "y 1 on", "n 0 off"
CURRENCY_CODES = "usd eur gbp chf jpy cad aud yen kr"
CURRENCY_SIGNS = "$€£¥₹"
SPACED_NUMBER_PATTERN = re.compile(r"(?<![\w.,])\d{1,3}(?: \d{3})+(?![\d.,]\d)")
# The value is the line up to its last non-space, or its one first character when all are spaces:
# what a lazy "(.+?)\s*$" takes, found by a greedy one, without a try of the end at every character.
# The label is greedy too, for the same reason: it then keeps the spaces before its mark ("word : x"
# gives "word "), which change nothing its users read of it (_input_named strips them, split()
# drops them); the lines found, and their values, are a lazy label's.
LINE_VALUE_PATTERN = re.compile(r"^\s*[-*]?\s*([A-Za-z][\w \-]{0,63})\s*[:=]\s*(.*\S|.)\s*$", re.M)
TYPED_VALUE_PATTERNS = FORMAT_PATTERNS   # their shape makes them unambiguous: read without a label
TEXT_KINDS = ("email", "url", "date", "place")     # kinds of the string type
NUMBER_KINDS = ("money", "year", "month")         # kinds of the number types
CLAUSE_MARKS = frozenset(",;.!?:()[]—|\n")
# The shapes that start with a digit are tried only where one stands (the lookahead): the same
# tokens, without four failed tries at every letter and space.
SHORT_ENDINGS = ("t", "s", "re", "ve", "ll", "d", "m")   # after an apostrophe, part of the word: "don't", "we're"
TOKEN_PATTERN = re.compile(
    r"(?=\d)(?:(?P<iso>\d{4}-\d{2}-\d{2})|(?P<dmy>\d{1,2}[./]\d{1,2}[./]\d{2,4}|\d{1,2}/\d{1,2}(?![\d/])"
    r"|(?:0?[1-9]|[12]\d|3[01])\.(?:0?[1-9]|1[0-2])\.(?![\d.]))"   # "vom 28.12. bis 2.1."
    r"|(?P<ordinal>\d{1,2}(?:st|nd|rd|th|er|e|º|ª)\b|\d{1,2}\.(?=\s+[^\W\d_]|\s*[–/-]\s*\d))|(?P<number>\d+(?:[.,]\d+)*))"
    r"|(?P<word>[^\W\d_]+(?:['’](?:" + "|".join(SHORT_ENDINGS) + r")\b)?(?:-[^\W\d_]+)*)|(?P<mark>\n|\S)")
# What opens a line that is an item of its own: a list or quote mark, or a label ("When: ...").
NEW_ITEM_PATTERN = re.compile(r"[ \t]*(?:[-*•>\"'“«]|\d+[.)][ \t]|[^\W\d_][\w \-]{0,63}?[ \t]*[:=])")
# A short capitalised abbreviation with its dot ("St. Louis", "Mt. Fuji") does not end a phrase.
ABBREVIATION_PATTERN = r"\b[A-Z][a-z]{0,2}\.(?=\s)"
# Before a dot that ends no sentence: an abbreviation ("St", "D.C") or a number ("3.–10. Juni").
NO_SENTENCE_END_BEFORE_PATTERN = re.compile(r"(?:\b[A-Z][a-z]?(?:\.[A-Z])*|\d)\Z")
SENTENCE_END_PATTERN = re.compile(r"(?<!\.)[.!](?![.!?])(?=\s+\S|\s*\Z)")   # not "?", nor "...": doubt goes on
# Marks that are not text: controls, bidirectional and zero-width marks, lone surrogates.
INVISIBLE_PATTERN = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\u200b-\u200f\u202a-\u202e\u2060-\u2069\ufeff"
                               "\ufffd\ud800-\udfff]")   # and the replacement mark a lone surrogate became
CODE_FENCE_PATTERN = re.compile(r"^[ \t]*(```|~~~)[^\n]*\n.*?(?:^[ \t]*\1[ \t]*$|\Z)", re.M | re.S)
# A passage in quotation marks, inside a line: what someone else wrote or we replied, pasted
# as context ("here is what you told my husband: '...'"). A straight quote opens only after a
# space or a colon and closes only before one, so an apostrophe ("l'hotel") is never taken.
QUOTED_PASSAGE_PATTERN = re.compile(
    r"\u201c[^\u201c\u201d\n]*\u201d|\u201e[^\u201c\u201d\u201e\n]*[\u201c\u201d]|\u00ab[^\u00ab\u00bb\n]*\u00bb"
    r"|\u2018[^\u2018\u2019\n]*\u2019(?![^\W\d_])"
    r"|(?:(?<=^)|(?<=[\s:(]))\"[^\"\n]*\"|(?:(?<=^)|(?<=[\s:(]))'[^'\n]*'(?=[\s.,;:!?)]|$)", re.M)
QUOTATION_MARKS = "\"'\u201c\u201d\u201e\u00ab\u00bb\u2018\u2019"
QUOTE_OPENERS = re.compile("[\u201c\u201e\u00ab\u2018\"']")   # the first mark of every passage above: a quick look
QUOTED_PASSAGE_MIN_WORDS = 4   # fewer is a value quoted for emphasis ("a trip to "Paris""), unless it quotes a label
CENTURY_OF_SHORT_YEARS = 2000   # "'27" is 2027
MAX_LABEL_WORDS = 3            # "travel dates: ..." labels a value; "my friend sent me this: ..." does not

# The commonest words of each language, folded, to tell which language a text is in (a question
# the LLM writes must be in the language of the user's message). Same shape for each language:
# pronouns, articles, question words, verbs of wanting, then travel and time words.


####################################################################################
# Reading: words, numbers and typed values
####################################################################################

@dataclass(init=False)
class Extraction:
    """The result of reading one user message."""
    values: Dict[str, Any] = field(default_factory=dict)     # accepted and coerced
    rejected: Dict[str, str] = field(default_factory=dict)   # name -> why, said to the user
    ignored: Dict[str, Tuple[Any, str]] = field(default_factory=dict)   # proposed, dropped: (raw, why)
    ambiguous: Dict[str, List[Any]] = field(default_factory=dict)       # several candidates: asked which
    intent: str = "provide"
    notes: List[str] = field(default_factory=list)           # for the thinking block
    llm_failed: bool = False                                 # then the question is not asked of it either
    question: Optional[str] = None                           # written by the extraction call (single call)
    question_assumes: frozenset = frozenset()                # the inputs that call gave values for

    def __init__(self, **given: Any) -> None:
        # Made for every message: the dataclass's __init__ of nine keyword parameters costs
        # twice this one. The fields of a value that never changes in place (intent, ...) are
        # the class's own until one is given or set.
        self.values = {}; self.rejected = {}; self.ignored = {}; self.ambiguous = {}; self.notes = []
        if given:
            _set_fields(self, given)


def _fold(text: str) -> str:
    """Lower case without accents, for matching words a user wrote."""
    text = str(text).casefold()
    if text.isascii():   # the common case, and no accents to strip: skip the slow path
        return text
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(char for char in decomposed if not unicodedata.combining(char))


@lru_cache(maxsize=None)   # a few dozen letters; scanning the accented ones costs 400 folds each
def _accented(letter: str) -> str:
    """The letters that fold to this one, as a regular expression class: "e" is [eèéêë...]."""
    found = [char for char in map(chr, range(0xC0, 0x250)) if _fold(char) == letter]
    return "[" + re.escape(letter) + "".join(found) + "]" if found else re.escape(letter)


def folded_pattern(words: Iterable[str]) -> str:
    """A regular expression for folded words as a user may write them, accents and all: a
    table's "e" (Italian "is") matches the "è" of the message."""
    return _folded_pattern(frozenset(words))


@lru_cache(maxsize=1024)   # the same few label sets, turn after turn
def _folded_pattern(words: frozenset) -> str:
    # Longest first, so a word is not matched by its own beginning; words of one length cannot
    # both match at one place, so their order does not matter.
    return "|".join("".join(map(_accented, word)) for word in sorted(words, key=lambda word: (-len(word), word)))


def word_tree_pattern(words: Iterable[str], joint: str = "") -> str:
    """A regular expression for any of the words, written as a tree of their letters:
    ["no", "non", "not", "ne"] is "n(?:e|o(?:(?:n|t))?)". The regex engine tries the branches of
    an alternation one by one wherever it looks, a hundred for a flat list of a hundred
    words; a tree tries a few letters. ``joint`` may stand between letters ("-?": "dr-ei")."""
    heads: Dict[str, List[str]] = {}
    for word in words:
        heads.setdefault(word[:1], []).append(word[1:])
    branches = []
    for head, rests in sorted(heads.items()):
        longer = [rest for rest in rests if rest]
        tail = joint + word_tree_pattern(longer, joint) if longer else ""
        branches.append(re.escape(head) + (f"(?:{tail})?" if longer and "" in rests else tail))
    return branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"


def initials_ahead(words: Iterable[str]) -> str:
    """A lookahead for the first letters of the words, put before their word_tree_pattern where
    the regex engine tries it at many places: one look at a letter that opens none of them fails
    at once, where the tree's branches are tried one by one."""
    return "(?=[" + "".join(sorted({re.escape(word[:1]) for word in words})) + "])"


def _words(text: str) -> List[str]:
    return re.findall(r"\w+", _fold(text))


# The language tables as the reader uses them: each field's words over every language. An
# entry a message can never match (not folded, an apostrophe, two words where one is read)
# stops the module from loading, naming the language, the field and the entry.
PHRASE_FIELDS = ("time_phrases", "cancel_phrases", "rerun_phrases", "approximations", "conclusions", "hedges")
WORD_PATTERN = re.compile(r"[^\W_]+(?:-[^\W_]+)*\Z")


def _language_entries(language: Language) -> Iterator[Tuple[str, str]]:
    """(field, entry) for every entry of a language: words, and the words of its phrases."""
    for spec in dataclasses.fields(language):
        value = getattr(language, spec.name)
        if spec.name in ("code", "name", "writes"):   # not words a message holds
            continue
        if spec.name == "months":
            texts = list(value)
        elif spec.name == "kind_words":
            texts = list(value.values())
        elif spec.name in ("cardinals", "ordinals"):
            texts = [" ".join(entry.partition(":")[0] for entry in value.split())]
        else:
            texts = value.replace(",", " ").split() if spec.name in PHRASE_FIELDS else [value]
        for text in texts:
            for word in text.split():
                yield spec.name, word


def check_language(language: Language) -> Language:
    """The language, if every entry can match a message's words; else ValueError."""
    if language.months and len(language.months) != 12:
        raise ValueError(f"language {language.code}: 'months' lists {len(language.months)} months, not 12")
    if language.writes:   # every sentence, each with its fields and no other
        for key, fields in WRITTEN_SENTENCES.items():
            written = {name for _, name, _, _ in string.Formatter().parse(language.writes.get(key, "")) if name}
            if key not in language.writes or written - set(fields):
                raise ValueError(f"language {language.code}, writes: {key!r} must be a text with the fields "
                                 f"{', '.join(fields) or 'no field'}, not {language.writes.get(key)!r}")
        if set(language.writes) - set(WRITTEN_SENTENCES):
            raise ValueError(f"language {language.code}, writes: unknown sentences "
                             f"{sorted(set(language.writes) - set(WRITTEN_SENTENCES))}")
    for name, word in _language_entries(language):
        if _fold(word) != word or "'" in word or not WORD_PATTERN.match(word):
            raise ValueError(f"language {language.code}, {name}: {word!r} can never match a message's words "
                             f"(write it folded: {_fold(word).replace(chr(39), '')!r})")
    return language


def words_of(field_name: str) -> frozenset:
    """One field's words, in every language."""
    return frozenset(word for language in LANGUAGES.values() for word in getattr(language, field_name).split())


def phrases_of(field_name: str) -> Tuple[Tuple[str, ...], ...]:
    """One phrase field's phrases, each as its words, longest first, in every language."""
    phrases = {tuple(phrase.split()) for language in LANGUAGES.values()
               for phrase in getattr(language, field_name).split(",") if phrase.strip()}
    return tuple(sorted(phrases, key=len, reverse=True))


def _phrase_pattern(field_name: str, whole: bool, flags: int = re.I) -> re.Pattern:
    """A pattern of one phrase field, matched on folded text: the whole message, or anywhere."""
    body = "|".join(r"[\s-]*".join(map(re.escape, phrase)) for phrase in phrases_of(field_name))
    return re.compile(r"\A\W*(?:" + body + r")\W*\Z" if whole else r"\b(?:" + body + r")\b", flags)


CHECKED_LANGUAGES = tuple(check_language(language) for language in LANGUAGES.values())
LANGUAGE_WORDS = MappingProxyType({language.name: frozenset(language.function_words.split())
                                   for language in LANGUAGES.values()})   # to tell a text's language
ALL_WORDS = frozenset(word for language in LANGUAGES.values() for _, word in _language_entries(language))
MONTHS = MappingProxyType({word: month for language in LANGUAGES.values()
                           for month, words in enumerate(language.months, 1) for word in words.split()})
# A season and a holiday word written as one word name a time too ("Herbstferien", "Osterferien",
# "Weihnachtsurlaub"): made from each language's own two lists, with the joins compounds take.
# So do a month and a unit of time its language glues to it ("Maiwoche", "Juliwochenende").
COMPOUND_TIMES = frozenset(
    [stem + join + holiday for language in LANGUAGES.values()
     for season in language.seasons.split() for holiday in language.holiday_words.split()
     for stem in {season, season[:-1], season[:-2]} for join in ("", "s")]   # "Osterferien", "Pfingstferien"
    + [month + unit for language in LANGUAGES.values() for names in language.months for month in names.split()
       for unit in language.month_compounds.split()])
SEASONS = words_of("seasons")
TIME_NAMES = words_of("weekdays") | SEASONS | MONTHS.keys() | COMPOUND_TIMES
TIME_PHRASES, APPROXIMATIONS = phrases_of("time_phrases"), phrases_of("approximations")
CONCLUSIONS = phrases_of("conclusions")


def by_first_word(phrases: Sequence[Tuple[str, ...]]) -> Mapping[str, Tuple[Tuple[str, ...], ...]]:
    """Phrases by their first word, each word's in the order given (longest first)."""
    return MappingProxyType({first: tuple(phrase for phrase in phrases if phrase[0] == first)
                             for first in {phrase[0] for phrase in phrases}})


CONCLUSIONS_BY_FIRST_WORD = by_first_word(CONCLUSIONS)
TIME_PHRASES_BY_FIRST_WORD = by_first_word(TIME_PHRASES)
UNCERTAIN_TIMES, SEASON_NOUNS, HOLIDAYS = words_of("uncertain_times"), words_of("season_nouns"), words_of("holiday_words")
TIME_UNITS, COUNT_WORDS, QUALIFIERS = words_of("time_units"), words_of("numbers"), words_of("qualifiers")
RELATIVES, PAST, REASONS = words_of("relatives"), words_of("past"), words_of("reasons")
HEARSAY, WENT, AMOUNT_LEADS = words_of("hearsay"), words_of("went"), words_of("amount_leads")
CONTEXT_OPENERS = REASONS | HEARSAY | WENT
WENT_SUBJECT_MAX_WORDS = 4   # "in May my mother went": the words before a trip made before that are its own
TIME_LINKS, LEADING_LINKS, ARTICLES = words_of("range_links"), words_of("period_leads"), words_of("articles")
RANGE_OPENERS = words_of("range_openers")
RANGE_WORDS, AND_WORDS = words_of("range_words"), words_of("and_words")
PLACE_LEADS, STAYS, CORRECTION_FILLERS = words_of("place_leads"), words_of("stays"), words_of("corrections")
MOTIONS = words_of("motions")
NEGATIONS, CONTRASTS, PREFERENCES = words_of("negations"), words_of("contrasts"), words_of("preferences")
WISHES, CHANGES, EXCESS = words_of("wishes"), words_of("changes"), words_of("excess")
EXCEPTS, EXCEPT_OPENERS = words_of("except_words"), words_of("except_openers")
ALTERNATIVES, NAME_JOINERS = words_of("alternatives"), words_of("name_joiners")
HEDGES_BY_FIRST_WORD = by_first_word(phrases_of("hedges"))
HEDGES = frozenset(word for phrases in HEDGES_BY_FIRST_WORD.values() for phrase in phrases for word in phrase)
NAME_STARTS, NAME_ENDS = words_of("name_starts"), words_of("name_ends")
CONFIRMATIONS, NON_ANSWERS, CANCELS = words_of("confirmations"), words_of("non_answers"), words_of("cancels")
SENTENCE_STARTS, PHRASE_STARTS = words_of("sentence_starts") | words_of("greetings"), words_of("phrase_starts")
COPULAS, LABEL_LINKS, COMMON_WORDS = words_of("copulas"), words_of("label_links"), words_of("common_words")
THOUSANDS = words_of("thousands")
COPULA_PATTERN = folded_pattern(COPULAS)   # matched in the text as written: "destinazione è Roma"
_THOUSAND = r"(?:[kK]|" + "|".join(sorted(THOUSANDS, key=len, reverse=True)) + r")\b"
NUMBER_PATTERN = re.compile(r"(?<![\w.,])[-+]?(\d{1,3}(?:[,.'’\u00a0\u202f]\d{3})+(?:[.,]\d+)?|\d+(?:[.,]\d+)?)"
                            r"(\s*" + _THOUSAND + r"|\s*[mM]\b(?!\w))?", re.I)
CURRENCIES = words_of("currency_words") | frozenset(CURRENCY_CODES.split())
RATE_WORDS, RATE_UNITS = words_of("rate_words"), words_of("rate_units") | TIME_UNITS
LIMITS = words_of("limits")


def valued_words(field_name: str, languages: Iterable[Language] = ()) -> Mapping[str, int]:
    """A field of "word:value" entries over every language (or ``languages``), hyphens
    dropped ("quatrevingt"); a word that two languages give different values could never be
    read, so it is refused."""
    values: Dict[str, int] = {}
    for language in languages or LANGUAGES.values():
        for entry in getattr(language, field_name).split():
            word, _, value = entry.partition(":")
            word = word.replace("-", "")
            if values.setdefault(word, int(value)) != int(value):
                raise ValueError(f"language {language.code}, {field_name}: {word!r} has two values")
    return MappingProxyType(values)


CARDINALS, ORDINALS = valued_words("cardinals"), valued_words("ordinals")
# A number word of the tables at the start of a word, in a message's words folded and joined
# by spaces: a word is made of number words only if it starts with one.
# By first letter, so a word is compared with the few that can start it, not two hundred (each
# is one word: the tables are split at spaces).
CARDINALS_BY_INITIAL = MappingProxyType({initial: tuple(sorted(word for word in CARDINALS if word[0] == initial))
                                         for initial in sorted({word[0] for word in CARDINALS})})
WORDS_BESIDES_MONTHS = frozenset(word for language in LANGUAGES.values()
                                 for field_name, word in _language_entries(language) if field_name != "months")
MONTH_SYNONYM_MIN_LETTERS = 4   # "mar" is also the sea, "jun" and "jul" are too short to be sure of
# Inside a glued number word only a join of several letters ("fünfundzwanzig"): one letter
# ("e", "y") would glue too much ("tree" is no "tre" and "e").
NUMBER_GLUES = frozenset(word for word in AND_WORDS if len(word) > 1)
NUMBER_WORD_PATTERN = re.compile(r"[^\W\d_]+(?:-[^\W\d_]+)*|\d+")
# Searched in " " + the lower-cased text: what stands before a word's start is matched, not looked
# back at, so the regex engine tries only where a non-letter stands (the space: the text's start).
NUMBER_WORD_TREE = word_tree_pattern(CARDINALS, joint="-?")   # (ASCII_NUMBER_WORD_START's, and ASCII_CUE_PATTERN's)
ASCII_NUMBER_WORD_START = re.compile(r"[^a-z]" + initials_ahead(CARDINALS) + r"(?<![a-z]-)" + NUMBER_WORD_TREE)
CARDINAL_PHRASE_MIN = 100   # smaller counts stay words: "two weeks" is read as a period, as written
BOOLEAN_WORDS = MappingProxyType({True: words_of("yes") | frozenset(SYMBOL_YES.split()),
                                  False: words_of("no") | frozenset(SYMBOL_NO.split())})
YES_OR_NO_WORDS = words_of("yes") | words_of("no")
KINDS = MappingProxyType({kind: frozenset(word for language in LANGUAGES.values()
                                          for word in language.kind_words.get(kind, "").split())
                          for kind in TEXT_KINDS + NUMBER_KINDS})
# Unions the reader looks words up in, made once rather than on every look-up.
YES_OR_NO = BOOLEAN_WORDS[True] | BOOLEAN_WORDS[False]
NEGATING = NEGATIONS | BOOLEAN_WORDS[False]
TIME_WORDS = TIME_NAMES | TIME_UNITS
# Words of money long enough to end a compound that labels an amount ("Gesamtbudget", "Urlaubsbudget").
COMPOUND_LABEL_HEADS = tuple(sorted(word for word in KINDS["money"] if len(word) >= 6))
# A word of travel long enough to start a compound that is a common noun ("Reiseplanung",
# "Urlaubsplanung"), when this many letters or more follow it: no name.
COMPOUND_TRAVEL_STARTS = tuple(sorted(word for word in MOTIONS - WISHES if len(word) >= 5))
COMPOUND_REST_MIN_LETTERS = 4
# Or that ends with a head of such compounds ("Städtetrip", "Badeurlaub").
COMPOUND_TRAVEL_PATTERN = re.compile(
    "(?:" + "|".join(map(re.escape, COMPOUND_TRAVEL_STARTS)) + r")\w{" + str(COMPOUND_REST_MIN_LETTERS) + r",}\Z"
    + r"|\w{" + str(COMPOUND_REST_MIN_LETTERS) + ",}(?:" + "|".join(map(re.escape, sorted(words_of("travel_heads"))))
    + r")\Z")
ABBREVIATION_MAX_LETTERS = 3   # "St", "Mt", "Ste": a capitalised word this short before a dot
# Month names long enough that one slip of the keyboard leaves them recognisable, and what each
# becomes with a letter dropped: a misspelt month is found through these (see _month_misspelt).
MONTH_TYPO_MIN_LETTERS = 6
LONG_MONTHS = frozenset(word for word in MONTHS if len(word) >= MONTH_TYPO_MIN_LETTERS)
MONTH_DELETIONS = MappingProxyType({word[:k] + word[k + 1:]: word for word in sorted(LONG_MONTHS)
                                    for k in range(len(word))})
LEADS_OR_LINKS = PLACE_LEADS | TIME_LINKS
NEVER_OPTIONS = NEGATIONS | TIME_LINKS | COUNT_WORDS
AFTER_A_COUNT = TIME_UNITS | QUALIFIERS | COUNT_WORDS
LINKS_OR_COUNTS = TIME_LINKS | COUNT_WORDS
LINKS_OR_QUALIFIERS = TIME_LINKS | QUALIFIERS
BEFORE_A_MONTH = LEADING_LINKS | QUALIFIERS | TIME_LINKS   # a misspelt month is read after them: "in setpember"
TIME_GLUE = COUNT_WORDS | QUALIFIERS | TIME_LINKS | HOLIDAYS | PAST
OF_JOINERS = NAME_JOINERS - ARTICLES - PLACE_LEADS   # "mercatini di Natale", not "Tokio en primavera"
QUALIFIES_A_UNIT = QUALIFIERS | HOLIDAYS | PAST   # "l'anno scorso", "el año pasado"
COUNTS_A_UNIT = COUNT_WORDS | QUALIFIERS
TIME_NAME_PARTS = TIME_NAMES | QUALIFIERS
SMALL_IN_A_CORRECTION = CORRECTION_FILLERS | PLACE_LEADS | ARTICLES | PREFERENCES
CHANGE_WORDS = CHANGES | PREFERENCES | CORRECTION_FILLERS
CLAUSE_OPENERS = AND_WORDS | REASONS | HEARSAY | WISHES   # where a clause about a trip made before ends
SMALL_BEFORE_A_NUMBER = LEADS_OR_LINKS | CONFIRMATIONS | CORRECTION_FILLERS   # "make it 700", "súbelo a 700"
CORRECTION_LEAD_WORDS = 3   # a correction's word stands this close before the value it gives: "mets plutôt 2500"
LISTED_AMOUNT_MIN = 100     # a bare number listed among values is an amount from this on ("Prague, 1200, ...")
AMOUNT_LEAD_MIN = 1000      # and after a word that brings it ("con 1500"): groups of 150 come "with" too
YEAR_MIN, YEAR_MAX = 1900, 2100   # a number in between, right after a period, is its year ("July, 2026")
LEADS_BEFORE_AN_OPTION = LEADS_OR_LINKS - ALTERNATIVES
CANCEL_PATTERN = _phrase_pattern("cancel_phrases", whole=True)
# The same for an ASCII folded text, which is lower case, as the phrases are: ignoring case there
# changes nothing (only "ı", "ſ", "K" and "İ" match ASCII letters of another case), and the regex
# engine passes over a phrase at its first letter only when it need not ignore case.
ASCII_CANCEL_PATTERN = (_phrase_pattern("cancel_phrases", whole=True, flags=0)
                        if all("".join(phrase).isascii() for phrase in phrases_of("cancel_phrases")) else CANCEL_PATTERN)
# The letters a cancel phrase opens with: only non-word characters may stand before it, so an
# ASCII folded text that opens with another letter or a digit ("word: hello") is no cancel, found
# without a match. (Every letter and digit where the pattern ignores case: no look-up of its folds.)
ASCII_CANCEL_INITIALS = (frozenset(phrase[0][:1] for phrase in phrases_of("cancel_phrases"))
                         if ASCII_CANCEL_PATTERN is not CANCEL_PATTERN else frozenset(string.ascii_letters + string.digits))
RERUN_PATTERN = _phrase_pattern("rerun_phrases", whole=False)
_RANGE = "|".join(map(re.escape, sorted(RANGE_WORDS, key=len, reverse=True)))
_RANGE_OR_AND = "|".join(map(re.escape, sorted(RANGE_WORDS | AND_WORDS, key=len, reverse=True)))
# A number right after its label ("budget: 1500", "budget of 2000"), not the start of a range ("1500-2000").
LABELLED_NUMBER = (r"\b(?:\s*(?:" + word_tree_pattern(COPULAS | LABEL_LINKS) + r"\b|=|:)){0,3}\s*[$€£¥]?\s*"
                   r"(-?\d{1,3}(?: \d{3})+(?![\d.,]?\d)|-?\d[\d.,'’\u00a0\u202f]*(?:\s*" + _THOUSAND + r")?)"
                   r"(?![\d.,]*\s*(?:-|–|(?:" + _RANGE + r")\b)\s*[$€£¥]?\d)")
RANGE_AFTER_PATTERN = re.compile(r"\s*(?:-|–|(?:" + _RANGE + r")\b)\s*[$€£¥]?\d", re.I)
RANGE_BEFORE_PATTERN = re.compile(r"\d\s*(?:-|–|\b(?:" + _RANGE_OR_AND + r"))\s*[$€£¥]?\s*\Z", re.I)
MONEY_PATTERN = re.compile(
    r"(?:(?P<sign>[" + CURRENCY_SIGNS + r"]|\b(?:US\$|" + "|".join(code.upper() for code in CURRENCY_CODES.split())
    + r")\b)\s?(?P<before>\d[\d.,'’]*\d|\d)(?P<k1>\s?" + _THOUSAND + r")?)"
    r"|(?:(?<![\w.,])(?P<after>\d{1,3}(?:[ \u00a0\u202f]\d{3})+(?![\d.,]\d)|\d[\d.,'’]*\d|\d)(?P<k2>\s?"
    + _THOUSAND + r")?"
    r"\s?(?P<unit>[" + CURRENCY_SIGNS + r"]|[^\W\d_]+)?)")


def parse_number(token: str) -> float:
    """'2,000' → 2000, '2.000,50' → 2000.5, '2,5' → 2.5, '2k' → 2000, '3 mil' → 3000."""
    if token.isdigit():   # "3", the commonest: nothing below would change it
        return float(token)
    text = re.sub(r"[\s'’\u00a0\u202f]", "", token)
    factor = 1
    word = re.search(r"[^\W\d_]{2,}\Z", text)
    if word and _fold(word.group(0)) in THOUSANDS:
        factor, text = 1_000, text[:word.start()]
    if text[-1:] in "kK":
        factor, text = 1_000, text[:-1]
    elif text[-1:] in "mM":
        factor, text = 1_000_000, text[:-1]
    if "," in text and "." in text:
        decimal = "," if text.rfind(",") > text.rfind(".") else "."
        text = text.replace("." if decimal == "," else ",", "").replace(",", ".")
    elif "," in text:
        text = text.replace(",", "") if re.fullmatch(r"[-+]?\d{1,3}(,\d{3})+", text) else text.replace(",", ".")
    elif re.fullmatch(r"[-+]?\d{1,3}(\.\d{3})+", text):   # "2.000" is two thousand, as in German
        text = text.replace(".", "")
    return float(text) * factor


def _number_or_none(token: str) -> Optional[float]:
    try:
        number = parse_number(token)
    except (ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None


def numbers_in(text: str, spaced: bool = False) -> List[float]:
    """The numbers a text states; with ``spaced``, "1 500" (French style) also counts as 1500."""
    found = [parse_number(match.group(0)) for match in NUMBER_PATTERN.finditer(str(text))]
    if spaced:
        found += [parse_number(match.group(0)) for match in SPACED_NUMBER_PATTERN.finditer(str(text))]
    return found


@lru_cache(maxsize=8192)   # the same words, message after message
def _number_parts(word: str, glued: bool = False) -> Optional[Tuple[int, ...]]:
    """The values a number word is made of, glued or hyphenated: "zweitausendfunfhundert" is
    (2, 1000, 5, 100); None when it is not made of number words alone."""
    if not word:
        return ()
    for end in range(len(word), 0, -1):   # longest first: "quatrevingt" before "quatre"
        head = word[:end]
        if head in CARDINALS or (glued and head in NUMBER_GLUES):
            rest = _number_parts(word[end:], True)
            if rest is not None:
                return ((CARDINALS[head],) if head in CARDINALS else ()) + rest
    return None


def cardinal_value(parts: Sequence[int]) -> int:
    """What number words say, in any of the tables' languages: each hundred or thousand
    multiplies what came before it ("trois mille cinq cents" is 3 x 1000 + 5 x 100)."""
    total = current = 0
    for value in parts:
        if value >= 1000:
            total, current = total + max(current, 1) * value, 0
        elif value == 100:
            current = max(current, 1) * 100
        else:
            current += value
    return total + current


def numbers_as_digits(text: str) -> str:
    """The text with amounts and years written in words put in digits, as the rest of the
    reader reads them: "deux mille euros" is "2000 euros", "duemilaventisette" is "2027".
    Only numbers of CARDINAL_PHRASE_MIN and more, of several number words or a thousand
    before a currency ("mil euros"); not a capitalised word inside a sentence ("Mila")."""
    if not _may_spell_a_number(text):
        return text   # no word starts with a number word: none can be one
    return _spelled_numbers_in_digits(text)


def _spelled_numbers_in_digits(text: str) -> str:
    """numbers_as_digits of a text a word of which starts with a number word."""
    words = list(NUMBER_WORD_PATTERN.finditer(text))
    pieces, last, index = [], 0, 0
    while index < len(words):
        first, parts, end = index, [], index
        while end < len(words):
            found = _spoken_number_parts(text, words[end])
            if found is None:   # "mil e quinhentos": a join counts only before another number word
                joined = (parts and _fold(words[end].group(0)) in AND_WORDS and end + 1 < len(words)
                          and _spoken_number_parts(text, words[end + 1]) is not None)
                if not joined:
                    break
                found = ()
            parts.extend(found)
            end += 1
        value = cardinal_value(parts)
        following = words[end].group(0) if end < len(words) else ""
        spoken = len(parts) > 1 or (parts and max(parts) >= 1000 and _fold(following) in CURRENCIES)
        after_digits = first > 0 and words[first - 1].group(0).isdigit()   # "3 mil reais" is read as it is
        if parts and spoken and value >= CARDINAL_PHRASE_MIN and not after_digits:
            pieces += [text[last:words[first].start()], str(value)]
            last = words[end - 1].end()
        index = max(end, first + 1)
    return "".join(pieces) + text[last:] if pieces else text


def _may_spell_a_number(text: str) -> bool:
    """Does a word of the text (NUMBER_WORD_PATTERN's, folded, its hyphens aside: "dr-ei")
    start with a number word? An ASCII text is looked through at once, lower-cased, where a
    word starts after anything but a letter or a hyphen that joins it to the letters before."""
    if text.isascii():
        return bool(ASCII_NUMBER_WORD_START.search(" " + text.lower()))
    spelled = _fold(" ".join(NUMBER_WORD_PATTERN.findall(text))).replace("-", "")
    return any(word.startswith(CARDINALS_BY_INITIAL.get(word[:1], ())) for word in spelled.split(" "))


def _spoken_number_parts(text: str, word: "re.Match") -> Optional[Tuple[int, ...]]:
    """The number word's parts (_number_parts), unless it is capitalised inside a sentence: a
    name, not a number ("Mila", "Cinque Terre")."""
    starts = word.start() == 0 or text[:word.start()].rstrip()[-1:] in ".!?:\n"
    if not (word.group(0)[:1].islower() or starts):
        return None
    return _number_parts(_fold(word.group(0)).replace("-", ""))


def input_kind(query: QueryInput) -> str:
    """What an input holds, for the reader: its type, or for text and numbers a kind its
    name and description name (a "place", a "date", "money", a "year", ...), else "text"
    or "number". Worked out once per input."""
    kind = query.derived.get("kind")
    if kind is None:
        kind = query.derived["kind"] = _input_kind(query)
    return kind


def _input_kind(query: QueryInput) -> str:
    if query.type not in ("string", "number", "integer"):
        return query.type
    words = set(_words(query.name.replace("_", " ") + " " + query.description))
    kinds = TEXT_KINDS if query.type == "string" else NUMBER_KINDS
    if query.type != "string" and set(_words(query.label)) & KINDS["year"]:
        return "year"
    return next((kind for kind in kinds if words & KINDS[kind]), "text" if query.type == "string" else "number")


def _head_and_rest(text: str) -> Tuple[str, str]:
    """A text's first part, up to a mark that says more ("sí, uno", "no (just us)"), and the rest."""
    parts = re.split(r"\s*[,;:(—–]", text, 1)
    return parts[0], parts[1] if len(parts) > 1 else ""


def coerce_value(query: QueryInput, raw: Any) -> Any:
    """The value in the input's declared type; ValueError says why not, in words for the user."""
    if isinstance(raw, list) and len(raw) == 1:   # weak models wrap a value in a list
        raw = raw[0]
    if query.type in NUMERIC_TYPES:
        return _coerce_number(query, raw)
    if query.type == "boolean":
        if isinstance(raw, bool):
            return raw
        word = _fold(str(raw)).strip(" .!")
        head, rest = _head_and_rest(word)
        # What follows says more ("sí, uno", "no (just us)"), unless it says yes or no again.
        decided = not set(re.findall(r"\w+", rest)) & YES_OR_NO_WORDS   # (not its symbols: "on va à Lyon")
        for value, words in BOOLEAN_WORDS.items():
            if word in words or (head in words and decided):
                return value
        count = _number_or_none(head) if head[:1].isdigit() else CARDINALS.get(head)
        if count is not None and decided:   # how many: "Kinder: 2", "enfants : deux, 8 et 10 ans"
            return count > 0
        named = _synonyms_named(query, str(raw))
        if len(named) == 1:
            return named.pop()
        raise ValueError(f"I need a yes or no for the {query.label}, not {as_written(raw)}")
    if query.type == "choice":
        return _match_choice(query, raw)
    # (query.label, a look-up, is fetched only to say why a value is refused)
    text = "" if isinstance(raw, (dict, list)) or raw is None else str(raw)
    if not text.strip():
        raise ValueError(f"I need some text for the {query.label}")
    # One line of plain text: a value never carries a code fence or line breaks into a workflow.
    # The common value, one word of printable ASCII ("hello", "Paris"), is one already: it has
    # no invisible mark, and no space or backtick to join or replace.
    printable = text.isascii() and text.isprintable()
    if not (printable and " " not in text and "`" not in text):
        if not printable:
            text = INVISIBLE_PATTERN.sub("", text)
        text = " ".join(text.replace("`", " ").split())
        if not text:
            raise ValueError(f"I need some text for the {query.label}")
    if query.type in FORMAT_PATTERNS and not FORMAT_PATTERNS[query.type].fullmatch(text):
        raise ValueError(f"I need {'an email address' if query.type == 'email' else 'a web address'} "
                         f"for the {query.label}, not {text!r}")
    return text


def as_written(raw: Any) -> str:
    """A refused value as it was written: text in quotes, a yes/no or a number as shown_value
    shows it, data as JSON; never Python's spelling (True, {'a': 1})."""
    if isinstance(raw, str):
        return repr(raw)
    if isinstance(raw, (bool, int, float)):
        return shown_value(raw)
    return json.dumps(raw, ensure_ascii=False, default=str)[:40]


def _coerce_number(query: QueryInput, raw: Any) -> Any:
    if isinstance(raw, str) and raw.isdigit() and raw.isascii() and not query.synonyms:
        if len(raw) <= 15:   # "3", the commonest: a whole number below MAX_NUMBER_VALUE, which float
            number = int(raw)   # reads exactly, so it is its own value for every numeric type
            if query.minimum is not None or query.maximum is not None:
                check_bounds(query, number)   # (an int's :g is its float's)
            return number
        number = float(raw)   # what _number_of finds in it, without its tests for data
    else:
        number = _number_of(query, raw)
    label = query.label   # (not fetched for the common whole number above, which nothing refuses but its bounds)
    if not math.isfinite(number):
        raise ValueError(f"I need a finite number for the {label}")
    if abs(number) > MAX_NUMBER_VALUE:   # 1e308 would be written out with 309 digits
        raise ValueError(f"the {label} is too large")
    if query.minimum is not None or query.maximum is not None:   # most inputs have no bound to check
        check_bounds(query, number)
    if query.type == "integer":
        if number != int(number):
            raise ValueError(f"I need a whole number for the {label}, not {str(raw)!r}")
        return int(number)
    return int(number) if number == int(number) else number


def _number_of(query: QueryInput, raw: Any) -> float:
    """The one number a value holds, before its bounds are checked; ValueError says why there is none."""
    label = query.label
    if isinstance(raw, (dict, list)):
        raise ValueError(f"I need a number for the {label}, not {as_written(raw)}")
    if isinstance(raw, bool):   # JSON's true is no number, whatever Python says
        raise ValueError(f"I need a number for the {label}, not {as_written(raw)}")
    if isinstance(raw, int) and abs(raw) > MAX_NUMBER_VALUE:   # before float(), which a huge int overflows
        raise ValueError(f"the {label} is too large")
    named = _synonyms_named(query, str(raw)) if query.synonyms else ()   # most inputs have none
    if isinstance(raw, (int, float)) and not isinstance(raw, bool):
        return float(raw)
    if len(named) == 1 and not numbers_in(str(raw)):   # "March" for a month, when the workflow says so
        return float(named.pop())
    if named:   # "May 3": a month and a number, or two months
        raise ValueError(f"I need the {label} alone, not {str(raw)!r}")
    if str(raw).isascii() and str(raw).isdigit():   # "3": the one number it is, as numbers_in reads it
        return float(str(raw))
    found = numbers_in(str(raw))
    spaced = SPACED_NUMBER_PATTERN.findall(str(raw))
    if len(spaced) == 1 and not re.search(r"\d", SPACED_NUMBER_PATTERN.sub("", str(raw))):
        found = [parse_number(spaced[0])]
    if len(found) != 1:
        raise ValueError(f"I need a single number for the {label}, not {str(raw)!r}")
    return found[0]


def _same_word(word: str, known: str) -> bool:
    """A word and a known word, allowing a short ending ("entspannte" is "entspannt")."""
    if word == known:
        return True
    shorter, longer = sorted((word, known), key=len)
    return len(shorter) >= 5 and longer.startswith(shorter) and len(longer) - len(shorter) <= 2


def _says_words(message_words: Sequence[str], phrase_words: Sequence[str]) -> bool:
    """Does the message hold the phrase's words in a row (allowing short endings)?"""
    size = len(phrase_words)
    return size > 0 and any(all(_same_word(message_words[start + k], phrase_words[k]) for k in range(size))
                            for start in range(len(message_words) - size + 1))


def synonyms_read(query: QueryInput) -> Tuple[Tuple[str, Any], ...]:
    """An input's synonyms as the reader reads them: the workflow's, and for an input whose
    synonyms name months ("January": 1), every table's name of those months in any case
    ("janeiro", "marco", "december"), but for one that is also another word of the tables
    ("sept" is seven, "march" and "may" are verbs too)."""
    found = query.derived.get("synonyms_read")
    if found is None:
        named = query.derived["month_values"] = {
            MONTHS[_fold(synonym)]: value for synonym, value in query.synonyms
            if _fold(synonym) in MONTHS and _number_or_none(str(value)) == MONTHS[_fold(synonym)]}
        found = query.derived["synonyms_read"] = tuple(query.synonyms) + tuple(
            (word, named[month]) for word, month in sorted(MONTHS.items())
            if month in named and len(word) >= MONTH_SYNONYM_MIN_LETTERS
            and word not in WORDS_BESIDES_MONTHS)
    return found


def _synonyms_named(query: QueryInput, text: str) -> set:
    """The values whose synonyms the text says, in any case ("march" names 3)."""
    synonyms = synonyms_read(query)
    if not synonyms:   # most inputs have none: the text need not be split
        return set()
    words = _words(text)
    return {value for synonym, value in synonyms if _says_words(words, _words(synonym))}


def _match_choice(query: QueryInput, raw: Any) -> str:
    wanted = _fold(str(raw)).strip(" .!\"'")
    folded = {_fold(choice): choice for choice in query.choices}
    folded.update({_fold(synonym): choice for synonym, choice in query.synonyms})
    if wanted in folded:
        return folded[wanted]
    prefixed = {choice for key, choice in folded.items()
                if len(wanted) >= 3 and key.startswith(wanted) or _same_word(wanted, key)}
    if len(prefixed) == 1:
        return prefixed.pop()
    raise ValueError(f"the {query.label} must be one of {', '.join(query.choices)}, not {as_written(raw)}")


def _topic_words(query: QueryInput) -> set:
    """The words that name an input ("travel", "dates"); its description is too loose for this."""
    return {word for word in _words(query.label) if len(word) >= 3 and word not in COMMON_WORDS}


PASTED_LINE_MIN_CHARS = 16   # a line this long found in one of our replies was pasted from it


def _without_a_long_passage(quoted: "re.Match") -> str:
    passage = quoted.group(0)
    if len(passage[1:-1].split()) < QUOTED_PASSAGE_MIN_WORDS and not re.search("[:=]", passage):
        return passage[1:-1]   # a value quoted: its marks must not stand between a place word and it
    inside = passage[1:-1].rstrip()
    return inside[-1] if inside[-1:] in ".!?" else ""   # gone, marks and all; a sentence it ended still ends


def _is_a_written_value(line: str) -> bool:
    """Is the line a label and a value taken as written, quotes and all: data ("word: {"a":
    1}") or one quotation ("title: "Our trip to Rome"")? Not "You wrote: "destination: Venice".
    No, Verona!", where the quotation is context."""
    labelled = LINE_VALUE_PATTERN.match(line)
    if not labelled or len(labelled.group(1).split()) > MAX_LABEL_WORDS:
        return False
    value = labelled.group(2)
    whole = QUOTED_PASSAGE_PATTERN.fullmatch(value)
    return value[:1] in "{[" or bool(whole)


LONG_MESSAGE_NOTE = (f"The message is long: only its first and last {READ_MAX_CHARS // 2:,} characters "
                     "were read.")


def within_reading_limit(text: str) -> str:
    """A message as far as it is read: all of it, or its first and last halves of
    READ_MAX_CHARS characters. What a user states is there, at the start or at the end of
    what they pasted; reading megabytes would hold a thread for a minute."""
    if len(text) <= READ_MAX_CHARS:
        return text
    half = READ_MAX_CHARS // 2
    return text[:half] + "\n" + text[len(text) - (READ_MAX_CHARS - half - 1):]


def user_words(text: str, history: Sequence[dict] = ()) -> str:
    """The user's own words in a message, cleaned for reading. Invisible marks go (a NUL, a
    bidirectional mark or a lone surrogate inside or before a name would hide it), and so does
    what is only context, which must never give values over the user's own words: fenced
    code blocks, quoted lines ("> ..."), passages of several words in quotation marks and lines
    pasted from one of our earlier replies. Amounts in words are put in digits ("deux mille")."""
    return _user_words(text, history)[0]


def _user_words(text: str, history: Sequence[dict]) -> Tuple[str, Optional[bool]]:
    """user_words, and whether a word of letters in them may rule something out (as
    _spans_change_nothing asks): False or True when the search of an ASCII text for its number
    words, made for both (ASCII_CUE_PATTERN), said so; None when it did not (the text is not
    ASCII, or a number word in it was put in digits)."""
    if len(text) > READ_MAX_CHARS:   # (the common message is read whole: no call to find so)
        text = within_reading_limit(text)
    if not (text.isascii() and text.replace("\n", " ").isprintable()):   # printable ASCII lines have no invisible mark
        text = INVISIBLE_PATTERN.sub("", text)
    if "```" in text or "~~~" in text:   # every fence opens with one: most messages have none to look for
        text = CODE_FENCE_PATTERN.sub("\n", text)
    ours = _our_replies(history) if history else []   # a chat's first message: no reply of ours to paste
    # In an ASCII text only a straight quote can open a passage: found without a regex.
    opens = ('"' in text or "'" in text) if text.isascii() else QUOTE_OPENERS.search(text)
    if not ours and ">" not in text and not (opens and QUOTED_PASSAGE_PATTERN.search(text)):
        return _in_digits(text.strip())   # no line is context (the common case): none to look at one by one
    kept = []
    for line in text.split("\n"):
        plain = " ".join(_fold(line).split())
        if line.lstrip().startswith(">") or (len(plain) >= PASTED_LINE_MIN_CHARS and any(plain in reply for reply in ours)):
            continue
        if not _is_a_written_value(line):
            line = QUOTED_PASSAGE_PATTERN.sub(_without_a_long_passage, line)
        kept.append(line)
    return _in_digits("\n".join(kept).strip())


def _in_digits(text: str) -> Tuple[str, Optional[bool]]:
    """numbers_as_digits(text), and whether a word of letters in it may rule something out, as _user_words says."""
    if not text.isascii():
        return numbers_as_digits(text), None
    lowered = " " + text.lower()
    cue = ASCII_CUE_PATTERN.search(lowered)
    if cue is None:   # the common message: no number word, and nothing that rules out
        return text, False
    if cue.lastgroup == "number" or ASCII_NUMBER_WORD_START.search(lowered, cue.start()):
        return _spelled_numbers_in_digits(text), None   # (the text may change: looked for again in what it becomes)
    return text, True


def _our_replies(history: Sequence[dict]) -> List[str]:
    """Our earlier replies, folded and with their spaces collapsed, as a pasted line is compared with them."""
    return [" ".join(_fold(message["content"]).split()) for message in history if message.get("role") == "assistant"]


def valid_text(text: str) -> str:
    """Text that can be written out: JSON allows a lone surrogate ("\\ud800"), UTF-8 does not,
    so each becomes the replacement character instead of failing the turn."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:   # json.loads joins valid pairs, so any surrogate left is alone
        return re.sub("[\ud800-\udfff]", "\ufffd", text)


####################################################################################
# Reading: typed spans of a message
####################################################################################

class Token(NamedTuple):
    """One word, number or mark of a message (a tuple: a message makes many, and a frozen
    dataclass costs several times as much to build)."""
    text: str
    folded: str          # lower case, no accents, no apostrophes
    start: int
    end: int
    shape: str           # "word", "number", "ordinal", "iso", "dmy" or "mark"

    @property
    def capitalised(self) -> bool:
        return self.shape == "word" and self.text[:1].isupper()


class Tokens(list):
    """A message's tokens, with an index of where each word stands, made once: a long message
    is looked through for every choice and synonym, and must not be scanned again each time."""
    text = ""   # the text they were read from, for spans quoted as written

    @cached_property
    def name_runs(self) -> Dict[frozenset, List[Tuple[int, int]]]:
        """_name_runs' answers, by the set of taken words they were found with."""
        return {}

    @cached_property
    def in_time_phrases(self) -> frozenset:
        """Indexes of tokens that are part of a time named by several words ("New Year's Eve")."""
        words = self.words
        found = set()
        for position, (_, token) in enumerate(words):
            for phrase in TIME_PHRASES_BY_FIRST_WORD.get(token.folded, ()):
                if position + len(phrase) <= len(words) and all(
                        words[position + k][1].folded == phrase[k] for k in range(1, len(phrase))):
                    found.update(words[position + k][0] for k in range(len(phrase)))
                    break
        return frozenset(found)

    @cached_property
    def all_lower_case(self) -> bool:
        """Whether no word starts with a capital: then names are read in lower case too."""
        return not any(token.text[:1].isupper() for token in self)

    @cached_property
    def has_season_noun(self) -> bool:
        """Whether any word is a season noun (else no word can be one before it: _names_a_season)."""
        return not SEASON_NOUNS.isdisjoint([token.folded for token in self])

    @cached_property
    def periods(self) -> List[Span]:
        """The message's periods (see period_spans), found once."""
        return period_spans(self, cached=False)

    @cached_property
    def words(self) -> List[Tuple[int, Token]]:
        return [(index, token) for index, token in enumerate(self) if token.shape != "mark"]

    @cached_property
    def where(self) -> Dict[str, List[int]]:
        """Positions in ``words`` by word, by the first part of a hyphenated word, and by the
        first five letters (for _same_word's short endings, under "~")."""
        found: Dict[str, List[int]] = {}
        for position, (_, token) in enumerate(self.words):
            folded = token.folded
            found.setdefault(folded, []).append(position)
            head = folded.split("-")[0] if "-" in folded else folded
            if head != folded:
                found.setdefault(head, []).append(position)
            if len(folded) >= 5:
                found.setdefault("~" + folded[:5], []).append(position)
        return found


def tokenize(text: str) -> Tokens:
    tokens = Tokens(_ascii_tokens(text) if text.isascii() else
                    [Token(match.group(0), _fold(match.group(0)).replace("'", "").replace("’", ""), match.start(),
                           match.end(), match.lastgroup) for match in TOKEN_PATTERN.finditer(text)
                     if match.group(0) != "\n" or _ends_an_item(text, match.start())])
    for index, token in enumerate(tokens):
        if (token.shape == "word" and len(token.folded) >= MONTH_TYPO_MIN_LETTERS and token.folded not in ALL_WORDS
                and not token.text[:1].isupper()   # a capitalised word is written with care, or a name: "Augusta"
                and index > 0 and (tokens[index - 1].shape in ("number", "ordinal")
                                   or tokens[index - 1].folded in BEFORE_A_MONTH)):
            month = _month_misspelt(token.folded)   # "in setpember", "anfang dezembr": read as the month
            if month:
                tokens[index] = token._replace(folded=month)
    tokens.text = text
    return tokens


def ascii_token_patterns(words: Iterable[str]) -> Tuple["re.Pattern[str]", ...]:
    """Where a token of an ASCII text may fold to one of these words, found in the lower-cased
    text without tokenizing it, by TOKEN_PATTERN's rules: a word between non-letters, maybe
    with its short ending after an apostrophe ("don't" folds to "dont"); a number between
    non-digits, or right after a date's digits, where a token ends at once ("2027-05-010").
    Together they may find more than the tokens hold (a find is checked against them), never
    less. Words and numbers are two patterns: each alone is looked for quickly, the number
    by its first digit. They are searched in " " + the lower-cased text: what stands before a
    word is matched, not looked back at, so the regex engine tries only where a non-letter stands."""
    forms = _ascii_token_forms(words)
    if forms is None:
        return (re.compile(""),)   # a word of another shape: found everywhere, so the tokens decide
    letters, digits = forms
    numbers = [number + _NUMBER_TOKEN_END.format(number=number) for number in digits]
    words_pattern = r"[^a-z]" + initials_ahead(letters) + word_tree_pattern(letters) + r"(?![a-z])" if letters else ""
    return tuple(re.compile(pattern) for pattern in [words_pattern] * bool(letters) + ["|".join(numbers)] * bool(numbers))


# Where a number token ends, right after the number: as TOKEN_PATTERN ends one (ascii_token_patterns).
_NUMBER_TOKEN_END = r"(?:(?<!\d{number})|(?<=-\d\d{number})|(?<=[./]\d{{4}}{number}))(?!\d|[.,]\d)"


def _ascii_token_forms(words: Iterable[str]) -> Optional[Tuple[List[str], List[str]]]:
    """What ascii_token_patterns look for: the words of letters, each with its short endings after
    an apostrophe, longest first, and the numbers; None when a word has another shape."""
    letters, digits = [], []
    for word in sorted(words, key=len, reverse=True):
        if not word.isascii():
            continue   # no token of an ASCII text folds to it
        if word.isdigit():
            digits.append(word)
        elif word.isalpha():
            letters += [word] + [word[:-len(ending)] + "'" + ending for ending in SHORT_ENDINGS
                                 if word.endswith(ending) and len(word) > len(ending)]
        else:
            return None
    return letters, digits


def ascii_cue_pattern(words: Iterable[str]) -> str:
    """One pattern, searched in " " + an ASCII text lower-cased, for what ASCII_NUMBER_WORD_START
    finds (as the group "number") and what ascii_token_patterns(words) find of the words made of
    letters. Each place where a non-letter stands is tried once for both: a number word or one of
    the words may start after it. (Their numbers are left to their own pattern, which the regex
    engine looks for by its first digit, more quickly than any place is tried here.)"""
    forms = _ascii_token_forms(words)
    if forms is None:
        return ""   # (found everywhere, as by ascii_token_patterns: the tokens decide)
    letters = forms[0]
    branches = [r"(?P<number>(?<![a-z]-)" + NUMBER_WORD_TREE + ")"]
    if letters:
        branches.append(word_tree_pattern(letters) + r"(?![a-z])")
    return r"[^a-z]" + initials_ahead(list(CARDINALS) + letters) + "(?:" + "|".join(branches) + ")"


def _ends_an_item(text: str, newline: int) -> bool:
    """Does the line break at ``newline`` end an item, a mark of its own: the next line opens
    one (a label, a list or quote mark), or this one is a ``label: value`` line? Text only
    wrapped ("Trip to New\nYork in May") goes on across it."""
    line_start = text.rfind("\n", 0, newline) + 1
    return bool(NEW_ITEM_PATTERN.match(text, newline + 1) or LINE_VALUE_PATTERN.fullmatch(text, line_start, newline))


def _ascii_tokens(text: str) -> List[Token]:
    """tokenize's tokens of an ASCII text (most messages): folding it is lower-casing it, done
    once for the whole text rather than per token, and each token is made as the plain tuple it
    is (a NamedTuple's own constructor is a Python call per token)."""
    folded, make, tokens = text.casefold(), tuple.__new__, []
    apostrophes = "'" in text
    for match in TOKEN_PATTERN.finditer(text):
        start, end = match.span()
        if text[start] == "\n" and not _ends_an_item(text, start):
            continue
        word = folded[start:end]
        tokens.append(make(Token, (text[start:end], word.replace("'", "") if apostrophes else word, start, end,
                                   match.lastgroup)))
    return tokens


def _deletions(word: str) -> List[str]:
    return [word[:k] + word[k + 1:] for k in range(len(word))]


def _month_misspelt(word: str) -> Optional[str]:
    """The month name a word is one slip away from (a letter missing, added, changed or two
    swapped), if it is: "dezembr", "setpember", "septembr"."""
    if word in MONTH_DELETIONS:
        return MONTH_DELETIONS[word]
    for shorter in _deletions(word):
        month = MONTH_DELETIONS.get(shorter) or (shorter if shorter in LONG_MONTHS else None)
        if month:
            return month
    return None


class Span(NamedTuple):
    """A piece of the message that can be a value: where it is, what it holds, and how it
    reads (a tuple, as Token is)."""
    holds: str           # "money", "date", "year", "number", "name", "choice", "boolean", "email", "url"
    start: int           # token indexes [start, end)
    end: int
    value: Any
    negated: bool = False


def _is_break(tokens: Sequence[Token], index: int) -> bool:
    token = tokens[index]
    if token.shape != "mark":
        return False
    if token.text in "-–/":   # "10-17 October" is one period; "Paris - Lyon" two clauses
        return not (0 < index < len(tokens) - 1 and tokens[index - 1].shape in ("number", "ordinal", "dmy")
                    and tokens[index + 1].shape in ("number", "ordinal", "dmy"))
    return token.text in CLAUSE_MARKS


def is_negated(tokens: Sequence[Token], index: int, reach: int = 4) -> bool:
    """Is the word at ``index`` ruled out by a word before it in its clause: "not relaxed",
    "no children", "anywhere but Paris", "sans enfants", "forget paris"? A contrast ("not Paris but Lyon")
    ends the negation's reach; a negated wish reaches twice as far ("I don't want to go in
    July"), a negated other verb does not ("I can't wait to see Paris")."""
    wished = False
    for back in range(index - 1, max(-1, index - 1 - 2 * reach), -1):
        token = tokens[back]
        if _is_break(tokens, back) or (token.folded in CONTRASTS and not _is_except(tokens, back)):
            return False
        if token.folded in NEGATIONS and back + 1 < index and (
                tokens[back + 1].shape == "mark" or tokens[back + 1].folded in CORRECTION_FILLERS):
            return False   # a "no" that stands alone takes back what came before: "no wait, i meant providence"
        if (back == index - 1 and token.folded in NEGATIONS & LEADING_LINKS and _is_time_word(tokens[index])
                and not tokens[index].text[:1].isupper()):   # "no Christmas" stays a negation
            return False   # a word that also leads into a time, right before one: "no carnaval" is "at carnival"
        if token.folded in NEGATIONS or _is_except(tokens, back):
            return index - back <= reach or wished
        if token.folded in CANCELS and index - back <= 2 and not (back and tokens[back - 1].folded in NEGATIONS):
            return True   # "forget paris", "vergiss München"; not "don't forget Paris"
        wished = wished or token.folded in WISHES
    return False


def _is_except(tokens: Sequence[Token], index: int) -> bool:
    return tokens[index].folded in EXCEPTS and index > 0 and tokens[index - 1].folded in EXCEPT_OPENERS


def _clause_is_question(tokens: Sequence[Token], index: int) -> bool:
    for token in tokens[index:]:
        if token.shape == "mark" and token.text in CLAUSE_MARKS:
            return token.text == "?"
    return False


def money_spans(text: str, tokens: Sequence[Token]) -> List[Span]:
    """Amounts with a currency: "$5000", "1 200 €", "3000 dólares", "2.000 Euro", and "2k"."""
    spans = []
    for match in MONEY_PATTERN.finditer(text):
        number, unit = match.group("before") or match.group("after"), match.group("unit")
        has_k = bool(match.group("k1") or match.group("k2"))
        currency = match.group("sign") or (unit and (unit in CURRENCY_SIGNS or _fold(unit) in CURRENCIES))
        if not currency and not has_k:
            continue
        if _starts_a_range(text, match.start()) or RANGE_AFTER_PATTERN.match(_fold(text[match.end():])):
            continue   # "1500-2000 euros" is a range, not one amount
        end_char = match.end() if (unit and currency) or match.group("sign") else match.end("after") + (
            len(match.group("k2")) if match.group("k2") else 0)
        amount = _number_or_none(number + ("k" if has_k else ""))
        if amount is None:
            continue
        first = next(i for i, token in enumerate(tokens) if token.end > match.start())
        last = max(i for i, token in enumerate(tokens) if token.start < end_char) + 1
        spans.append(Span("money", first, last, amount, is_negated(tokens, first)))
    return spans


def _starts_a_range(text: str, position: int) -> bool:
    return bool(RANGE_BEFORE_PATTERN.search(_fold(text[:position])))


def _time_role(tokens: Sequence[Token], index: int) -> Optional[str]:
    """"anchor" (a month, a day, "a week"), "glue" (numbers, links, qualifiers that belong to
    a period next to an anchor) or None."""
    token, previous = tokens[index], tokens[index - 1] if index else None
    if token.shape in ("iso", "dmy") or index in getattr(tokens, "in_time_phrases", ()):
        return "anchor"
    if token.shape == "ordinal":
        return "glue"
    if token.shape == "number":
        number = _number_or_none(token.folded)
        if number is None:   # "1.2.3", "10.0.0.1": a version or an address, not a time
            return None
        if 1 <= number <= 31 and number == int(number):
            return "glue"
        after_month = previous is not None and previous.folded in MONTHS
        return "glue" if after_month and 1900 <= number <= 2100 else None
    if token.shape == "mark":   # an emoji or a symbol ends a period: "cada una 🙈 este año"
        return "glue" if token.text in "'’" or (not _is_break(tokens, index)
                                                and unicodedata.category(token.text[0])[0] == "P") else None
    parts = token.folded.split("-") if "-" in token.folded else None   # a word alone: only TIME_NAMES can name it
    if token.folded in TIME_NAMES or (parts is not None and any(part in TIME_NAMES for part in parts)
                                      and all(part in TIME_NAME_PARTS for part in parts)):
        if token.folded in UNCERTAIN_TIMES and not _certainly_time(tokens, index):
            return None
        if token.folded in SEASONS and _names_a_thing(tokens, index):
            return None
        return "anchor"
    if token.folded in TIME_UNITS:   # "a week", "10 days", "next month", "le mois prochain", "el mes que viene"
        following = [t.folded for t in tokens[index + 1:index + 3]]
        if previous is not None and previous.folded in TIME_LINKS and index >= 2:
            previous = tokens[index - 2]   # "une dizaine de jours", "a couple of days", "fim do ano"
        counted = previous is not None and (previous.shape in ("number", "ordinal")
                                            or previous.folded in COUNTS_A_UNIT)
        if following and following[0] in RELATIVES:   # "el mes que viene"
            following = following[1:]
        qualified = bool(following) and following[0] in QUALIFIES_A_UNIT
        return "anchor" if counted or qualified else "glue"   # "la semaine du 14 avril", "the week after Easter"
    if token.folded in TIME_GLUE:
        return "glue"
    if token.shape == "word" and getattr(tokens, "has_season_noun", True) and _names_a_season(tokens, index):
        return "glue"
    return None


def _names_a_thing(tokens: Sequence[Token], index: int) -> bool:
    """Does the holiday at ``index`` only say what a thing is, after a word of no time and a
    joining word: "i mercatini di Natale", "os presentes de natal", "le marché de Noël"?"""
    if index < 2 or tokens[index - 1].folded not in OF_JOINERS:
        return False
    thing = tokens[index - 2]
    return (thing.shape == "word" and not thing.capitalised and not _is_time_word(thing, tokens, index - 2)
            and thing.folded not in TIME_GLUE | MOTIONS)


def _names_a_season(tokens: Sequence[Token], index: int) -> bool:
    """Is this plain word one of up to two before a season noun: "the cherry blossom season"?"""
    for ahead in tokens[index + 1:index + 3]:
        if ahead.folded in SEASON_NOUNS:
            return True
        if ahead.shape != "word" or ahead.capitalised or ahead.folded in LEADS_OR_LINKS:
            return False
    return False


def _certainly_time(tokens: Sequence[Token], index: int) -> bool:
    """"May" is a month in "in May", "May 3", "early May", not in "May I ask" or "I may"."""
    token = tokens[index]
    before = tokens[index - 1] if index else None
    after = tokens[index + 1] if index + 1 < len(tokens) else None
    if not token.capitalised:   # in lower case only where nothing else fits: "in may", "the first week of may"
        return before is not None and (before.folded in LEADING_LINKS or before.shape in ("number", "ordinal") or (
            before.folded in TIME_LINKS and index > 1 and tokens[index - 2].folded in TIME_UNITS | QUALIFIERS))
    return ((before is not None and (before.folded in LINKS_OR_QUALIFIERS or before.shape in ("number", "ordinal")))
            or (after is not None and after.shape in ("number", "ordinal")))


def period_spans(tokens: Sequence[Token], cached: bool = True) -> List[Span]:
    """Dates and periods in words: "in April", "a week in mid-October", "from 10 to 17
    October", "im Juli", "del 3 al 10 de junio", "2026-05-01 to 2026-05-08". The value is the
    user's own words, without the word that leads into it ("in April" is April)."""
    if cached and isinstance(tokens, Tokens):
        return tokens.periods
    roles = [_time_role(tokens, index) for index in range(len(tokens))]
    spans, index = [], 0
    while index < len(tokens):
        if roles[index] is None:
            index += 1
            continue
        end = index
        while end < len(tokens) and roles[end] is not None:
            end += 1
        start, stop = index, end
        while stop > start and roles[stop - 1] == "glue" and (tokens[stop - 1].folded in LINKS_OR_COUNTS
                                                             or tokens[stop - 1].shape == "mark"):
            stop -= 1   # trimmed first, so a trailing "and" closes no range
        while start < stop and roles[start] == "glue" and _leads_into_period(tokens, start) and not (
                _opens_a_range(tokens, start, stop)):
            start += 1
        if any(roles[k] == "anchor" for k in range(start, stop)) and not _is_an_age(tokens, start, stop):
            stop += _approximation_after(tokens, stop)   # "10 days or so"
            spans.append(Span("date", start, stop, None, is_negated(tokens, start)))
        index = end
    return spans


def _is_an_age(tokens: Sequence[Token], start: int, stop: int) -> bool:
    """Is tokens [start, stop) a count of years after a word and "of": an age, not a period
    ("mon fils de 8 ans", "a daughter of 9 years")?"""
    if stop - start != 2 or tokens[stop - 1].folded not in KINDS["year"] or start < 2:
        return False
    thing = tokens[start - 2]
    return (tokens[start - 1].folded in OF_JOINERS and thing.shape == "word"
            and not _is_time_word(thing, tokens, start - 2) and thing.folded not in TIME_GLUE | MOTIONS)


def _opens_a_range(tokens: Sequence[Token], index: int, stop: int) -> bool:
    """Is the word at ``index`` the opening of a range closed later in the period ("from 10 to
    17", "von Ende Juli bis Mitte August", "entre 4 e 11 de maio")? Then it stays: without it
    "4 e 11 de maio" reads as two days."""
    return (tokens[index].folded in RANGE_OPENERS and index + 1 < stop and tokens[index + 1].shape != "mark"
            and any(token.folded in TIME_LINKS | AND_WORDS and token.folded not in ARTICLES
                    for token in tokens[index + 2:stop]))


def _approximation_after(tokens: Sequence[Token], index: int) -> int:
    """How many tokens from ``index`` make a phrase that leaves a period approximate: "or so"."""
    for phrase in APPROXIMATIONS:
        if tuple(token.folded for token in tokens[index:index + len(phrase)]) == phrase:
            return len(phrase)
    return 0


def _leads_into_period(tokens: Sequence[Token], index: int) -> bool:
    token = tokens[index]
    if token.shape == "mark":
        return True
    if token.folded in COUNT_WORDS and token.folded in LEADING_LINKS:   # "a settembre", not "a week"
        following = tokens[index + 1] if index + 1 < len(tokens) else None
        return following is not None and following.folded not in AFTER_A_COUNT
    return token.folded in LEADING_LINKS or (token.folded in TIME_LINKS and token.folded not in COUNT_WORDS
                                             and token.folded not in ARTICLES)


def name_spans(tokens: Sequence[Token], leads: frozenset, taken: frozenset, alone: bool = False,
               listing: bool = False) -> List[Span]:
    """Capitalised names after a word that leads to one ("to Lisbon", "nach Berlin"), or
    ruled out after a negation ("not Paris"), and the name that replaces a ruled-out one
    ("Not Paris — Lyon", "Pas Nice, plutôt Cannes"). With ``alone``, also a name that is a
    clause of its own ("Rome, 1500 euros", "Florence it is.", "Kyoto"). A name in a hedged
    clause ("somewhere in Italy, maybe?") is left open: neither taken nor ruled out."""
    spans: List[Span] = []
    compounds = PLACE_LEADS <= leads
    for index, end in _qualified(tokens, _name_runs(tokens, taken)):
        value = _span_text(tokens, index, end)
        if _is_hedged(tokens, index, end):
            continue
        negated = is_negated(tokens, index)
        corrects = bool(spans) and not spans[-1].negated and _corrects(tokens, spans[-1].end, index)
        if corrects:   # "Roma, bueno no, a Florencia": the earlier name is ruled out
            spans[-1] = spans[-1]._replace(negated=True)
        replaces = bool(spans) and spans[-1].negated and (corrects or (
            _follows_closely(tokens, spans[-1].end, index) and (   # "not Paris, France is too dear" replaces nothing
                _clause(tokens, index, end)[1] == end or any(token.shape != "mark"
                                                             for token in tokens[spans[-1].end:index]))))
        chosen = end < len(tokens) and tokens[end].folded in PREFERENCES   # "let's do Florence instead"
        if negated or replaces or chosen or _led_by(tokens, index, leads, end, compounds) or (
                alone and (_stands_alone(tokens, index, end, listing) or _after_a_conclusion(tokens, index)
                           or _after_a_correction(tokens, index))):
            retracted = _retracted(tokens, end)   # "to Rome, actually no, ..."
            spans.append(Span("name", index, end, value, (negated and not replaces) or retracted))
    regions = {span.value.partition(",")[0] for span in spans if "," in span.value}
    return [span for span in spans if span.value not in regions]   # "Toronto, Canada ... in Toronto" is one place


def _clause(tokens: Sequence[Token], index: int, end: int) -> Tuple[int, int]:
    """The token indexes [first, end) of the clause that holds tokens [index, end)."""
    first = index
    while first > 0 and not _is_break(tokens, first - 1):
        first -= 1
    last = end
    while last < len(tokens) and not _is_break(tokens, last):
        last += 1
    return first, last


def _stands_alone(tokens: Sequence[Token], index: int, end: int, listing: bool = False) -> bool:
    """Is the name a clause of its own: a list item ("Rome, 1500 euros", "Kyoto"), a value
    after a colon, or a sentence of the name and words that confirm it ("Florence it is.",
    "yeah Seville it is", "Pode ser Bruxelas sim")? With ``listing`` (the message also gives
    an amount or a period), a sentence of the name alone too ("Kreta. Budget 2500, ...").
    Not a sentence of its own that ends otherwise ("Honeymoon!! Santorini, 4.5k")."""
    first, last = _clause(tokens, index, end)
    rest = [token for token in tokens[first:index] + tokens[end:last] if token.shape != "mark"]
    ends_an_item = last == len(tokens) or tokens[last].text in ",;" or (listing and tokens[last].text in ".!")
    if not rest and (ends_an_item or (first > 0 and tokens[first - 1].text == ":")):
        return True   # "Rome, 1500 euros", "Quick one: Berlin, ...", "la montagne : Chamonix."
    sentence_start = first == 0 or tokens[first - 1].text in ".!?\n"
    return sentence_start and bool(rest) and all(token.folded in CONFIRMATIONS | BOOLEAN_WORDS[True]
                                                 for token in rest) and (
        last == len(tokens) or tokens[last].text in ".!?\n,;")


def _is_hedged(tokens: Sequence[Token], index: int, end: int) -> bool:
    """Does the clause of tokens [index, end) leave its value open ("somewhere in Italy",
    "vielleicht Wien"), or does the next clause only hedge it ("Italy, maybe?")?"""
    first, last = _clause(tokens, index, end)
    first = max([first] + [start + size for start, size in _conclusions_in(tokens, first, index)])
    if _hedges_in(tokens, first, last):   # "somewhere quieter, so we're heading to X"
        return True
    following = []
    for position in range(last + 1, len(tokens)):
        if _is_break(tokens, position):
            break
        following.append(tokens[position])
    return bool(following) and _hedges_in(following, 0, len(following)) == len(following)


def _hedges_in(tokens: Sequence[Token], first: int, last: int) -> int:
    """How many of tokens [first, last) are words of a hedge ("maybe", "tal vez"; not the
    "tal" of "¿qué tal Tulum?")."""
    covered, start = 0, first
    while start < last:
        size = _phrase_at(tokens, start, last, HEDGES_BY_FIRST_WORD)
        covered += size
        start += size or 1
    return covered


def _phrase_at(tokens: Sequence[Token], start: int, last: int,
               phrases: Mapping[str, Tuple[Tuple[str, ...], ...]]) -> int:
    """The length of the first of ``phrases`` (by_first_word's) that tokens [start, last)
    open with, or 0."""
    for phrase in phrases.get(tokens[start].folded, ()):
        if start + len(phrase) <= last and tuple(token.folded for token in tokens[start:start + len(phrase)]) == phrase:
            return len(phrase)
    return 0


def _conclusions_in(tokens: Sequence[Token], first: int, end: int) -> List[Tuple[int, int]]:
    """(start, length) of each phrase of conclusion in tokens [first, end): what follows one
    is decided, whatever came before it in the clause."""
    found: List[Tuple[int, int]] = []
    if isinstance(tokens, Tokens) and CONCLUSIONS_BY_FIRST_WORD.keys().isdisjoint(tokens.where):
        return found   # none in the message: nothing to look for
    for start in range(first, end):
        size = _phrase_at(tokens, start, len(tokens), CONCLUSIONS_BY_FIRST_WORD)   # it may end past ``end``
        if size:
            found.append((start, size))
    return found


def _after_a_correction(tokens: Sequence[Token], index: int) -> bool:
    """Is the name at ``index`` what a correction gives, marks aside: "nee, Budapest.",
    "no wait, Rome", "anzi, Napoli"?"""
    before = index - 1
    while before > 0 and tokens[before].shape == "mark":
        before -= 1
    if before < 0 or before == index - 1 and tokens[before].folded in NEGATING:
        return False   # "no Paris" rules Paris out
    _, last = _clause(tokens, index, index + 1)
    if last > index + 1 and any(token.shape != "mark" for token in tokens[index + 1:last]):
        return False   # "No, Paris is too expensive": the name is talked about, not given
    word = tokens[before].folded
    return word in CORRECTION_FILLERS or (word in NEGATING and tokens[before + 1].shape == "mark")


def _after_a_conclusion(tokens: Sequence[Token], index: int) -> bool:
    """Does a phrase of conclusion end right before the name at ``index``, marks aside: "así
    que Berlín", "donc voilà, Rome !"?"""
    before = index
    while before > 0 and tokens[before - 1].shape == "mark":
        before -= 1
    return any(start + size == before for start, size in _conclusions_in(tokens, max(0, before - 3), before))


def _qualified(tokens: Sequence[Token], runs: List[Tuple[int, int]]) -> List[Tuple[int, int]]:
    """A name and the region after its comma are one place ("Toronto, Canada for work",
    "Paris, Texas (yes, that one)"; in "Paris, Texas, not Paris, France" the two Parises are
    "Paris, Texas" and "Paris, France"); the same name alone elsewhere is that place too.
    Names in a list stay apart: "Paris, London or Rome", "Rome, Florence, Venice"."""
    heads: Dict[str, set] = {}
    pairs = [(k, runs[k], runs[k + 1]) for k in range(len(runs) - 1)
             if runs[k][1] + 1 == runs[k + 1][0] and tokens[runs[k][1]].text == ","]
    for _, (start, end), qualifier in pairs:
        heads.setdefault(_span_text(tokens, start, end), set()).add(_span_text(tokens, *qualifier))
    joined, skip = [], set()
    for k, run in enumerate(runs):
        if k in skip:
            continue
        pair = next((p for p in pairs if p[0] == k), None)
        listed = k > 0 and runs[k - 1][1] + 1 == run[0]   # "Rome, Florence, Venice": the run before is one comma away
        if pair is not None and (len(heads.get(_span_text(tokens, *run), ())) > 1
                                 or (not listed and _is_a_region(tokens, run, pair[2]))):
            joined.append((run[0], pair[2][1]))
            skip.add(k + 1)
        else:
            joined.append(run)
    return joined


def _is_a_region(tokens: Sequence[Token], head: Tuple[int, int], qualifier: Tuple[int, int]) -> bool:
    """Is ``qualifier``, after the comma that follows ``head``, its region rather than the next
    name of a list: neither of them beside another comma or a word that lists ("or", "and")?"""
    before = tokens[head[0] - 1].folded if head[0] > 0 else ""
    after = tokens[qualifier[1]].text if qualifier[1] < len(tokens) else ""
    letters = [len(token.folded) for token in tokens[qualifier[0]:qualifier[1]]]
    if min(letters) < 2 or (after and after[0] in CURRENCY_SIGNS):
        return False   # "Viagem ao Rio, R$3 mil": a currency, not a region
    return before not in ALTERNATIVES | AND_WORDS and _fold(after) not in {","} | ALTERNATIVES | AND_WORDS


def _retracted(tokens: Sequence[Token], end: int) -> bool:
    """Is the name that ends at ``end`` taken back right after: "Rome, actually no, ..."?"""
    after = tokens[end:end + 5]
    for k, token in enumerate(after):
        if token.folded in NEGATING:
            return k + 1 < len(after) and after[k + 1].shape == "mark"
        if not (token.shape == "mark" and token.text not in ".!?" or token.folded in CORRECTION_FILLERS):
            return False
    return False


def _led_by(tokens: Sequence[Token], index: int, leads: frozenset, end: int, compounds: bool = False) -> bool:
    """Does a word of ``leads`` stand right before the name, or before its article, and not
    after a word of being somewhere ("I'm in London", "Ich wohne in Hamburg")? A wish leads
    only to a name that ends its phrase ("I want Rome", "Volevo Verona."), not to a word that
    describes the next one ("I'd like Italian food")."""
    before = index - 1
    if before >= 1 and tokens[before].folded in ARTICLES:
        before -= 1
    staying = before >= 1 and tokens[before - 1].folded in STAYS
    # With the words that lead to a place, a compound of travel does: "Städtetrip Prag".
    if before < 0 or staying or tokens[before].folded not in leads and not (
            compounds and _is_a_travel_compound(tokens[before].folded)):
        return False
    return tokens[before].folded not in WISHES - PLACE_LEADS or end == len(tokens) or (
        tokens[end].shape != "word" or tokens[end].folded in PLACE_LEADS | LEADING_LINKS | AND_WORDS)


def _is_a_lone_no(tokens: Sequence[Token], index: int) -> bool:
    """Is the word at ``index`` a "no" that stands alone, a mark or a filler after it ("no, 1200",
    "no wait, Rome", "anzi no, a Seul"): it takes back what came before, and negates nothing after?"""
    return (tokens[index].folded in NEGATING and index + 1 < len(tokens)
            and (tokens[index + 1].shape == "mark" or tokens[index + 1].folded in CORRECTION_FILLERS))


def _corrects(tokens: Sequence[Token], after: int, index: int) -> bool:
    """Between two names, a "no" that stands alone, or a word of preference, followed only by
    small words up to the name: "Québec ? Ah non pardon, Montréal", "Tokyo, anzi no, a Seul",
    "nach Paris, aber jetzt doch lieber nach Amsterdam"."""
    between = tokens[after:index]
    small = SMALL_IN_A_CORRECTION
    if between and between[0].folded in PREFERENCES:
        return False   # "make it Florence instead, Rome is too crowded": the preference is Florence's
    for k, token in enumerate(between):
        # "bueno no, a Florencia", not "Barcelona, not to Valencia" (that "not" rules out Valencia)
        if (_is_a_lone_no(tokens, after + k) or token.folded in PREFERENCES) and all(
                rest.shape == "mark" and rest.text not in ".!?" or rest.folded in small for rest in between[k + 1:]):
            return len(between) <= 10
    return False


def _name_end(tokens: Sequence[Token], index: int, taken: frozenset) -> int:
    """The end of a capitalised name starting at ``index`` ("New York", "Rio de Janeiro"),
    or ``index`` when none starts there."""
    end = index
    if tokens[index].folded in PLACE_LEADS - ARTICLES:   # capitalised at a sentence's start: "À Québec"
        return index
    while end < len(tokens):
        token = tokens[end]
        city = end > index and token.capitalised and token.folded in NAME_ENDS   # "Salt Lake City", "Mexico City"
        if city or token.capitalised and token.folded not in taken and not _is_time_word(token, tokens, end) and not (
                token.folded.endswith(COMPOUND_LABEL_HEADS)   # "Gesamtbudget" labels an amount
                or _is_a_travel_compound(token.folded)):
            end += 1
            if (len(token.text) <= ABBREVIATION_MAX_LETTERS and end + 1 < len(tokens) and tokens[end].text == "."
                    and tokens[end + 1].capitalised):
                end += 1   # "St. Gallen", "Mt. Fuji": the abbreviation's dot is inside the name
        elif (end > index and token.folded in NAME_JOINERS and end + 1 < len(tokens)
              and tokens[end + 1].capitalised and tokens[end + 1].folded not in taken
              and (not _is_time_word(tokens[end + 1], tokens, end + 1) or (
                  tokens[end + 1].folded in MONTHS and end + 1 not in getattr(tokens, "in_time_phrases", ())
                  and _ends_a_name(tokens, end + 2)))):
            end += 1   # "Rio de Janeiro" (in May), not "Lisboa de Janeiro a Março"
            if _is_time_word(tokens[end], tokens, end):
                end += 1
                break
        else:
            break
    while end > index and tokens[end - 1].folded in NAME_JOINERS:
        end -= 1
    return end


def _ends_a_name(tokens: Sequence[Token], index: int) -> bool:
    """Could a name end before ``index``: nothing follows, or no word that joins a range?"""
    return index >= len(tokens) or (tokens[index].folded not in RANGE_WORDS | AND_WORDS
                                    and tokens[index].shape not in ("number", "ordinal"))


def _name_runs(tokens: Sequence[Token], taken: frozenset) -> List[Tuple[int, int]]:
    """(first, end) token indexes of each capitalised name, in order; found once per message
    and set of taken words (the spans, the direct reply and the periods all ask)."""
    memo = tokens.name_runs if isinstance(tokens, Tokens) else {}
    if taken not in memo:
        runs, index = [], 0
        while index < len(tokens):
            end = _name_end(tokens, index, taken)
            if end > index:
                runs.append((index, end))
            index = max(end, index + 1)
        memo[taken] = runs
    return memo[taken]


def _names_in(tokens: Sequence[Token], taken: frozenset) -> List[str]:
    """Every capitalised name in the message, once each."""
    return list(dict.fromkeys(_span_text(tokens, start, end) for start, end in _name_runs(tokens, taken)))


def _is_time_word(token: Token, tokens: Sequence[Token] = (), index: int = -1) -> bool:
    """A word of time ("May", "week"), or part of a time named by several words."""
    return (any(part in TIME_WORDS for part in token.folded.split("-"))
            or index in getattr(tokens, "in_time_phrases", ()))


def _is_a_travel_compound(word: str) -> bool:
    """A noun made on a word of travel: "reiseplanung", "urlaubsplanung" (not "tripoli")."""
    return COMPOUND_TRAVEL_PATTERN.match(word) is not None


def _correction_before(tokens: Sequence[Token], after: int, index: int, contrast_anywhere: bool = False) -> bool:
    """Is the value at ``index`` said as a correction of one that ends at ``after``: among the
    last words before it, a contrast ("2000, but rather 2500"), a "no" that stands alone
    ("2026, euh non, 2027") or a word of correction, preference or change ("1800 €. Ah non,
    mets plutôt 2500", "abril, no espera, mejor junio", "make it the weekend after next")?
    A contrast further back is of something else ("March 2026, but my visa ends 2027"), but
    with ``contrast_anywhere``: two amounts or periods either side of one are two choices,
    the later kept ("... 400 euro, ma quella è un'altra storia. ... budget totale 900 euro")."""
    between = tokens[after:index]
    if between and between[0].folded in PREFERENCES:
        return False   # "2500 instead, 2000 is too little": the preference is the earlier value's
    if contrast_anywhere and any(token.folded in CONTRASTS and not _is_except(tokens, after + k)
                                 for k, token in enumerate(between)):
        return True
    words = [k for k, token in enumerate(between) if token.shape != "mark"][-CORRECTION_LEAD_WORDS:]
    for k in words:
        token = between[k]
        if token.folded in CONTRASTS and not _is_except(tokens, after + k):
            return True
        if token.folded in NEGATING and k + 1 < len(between) and between[k + 1].shape == "mark" and (
                between[k + 1].text not in ".!?"):
            return True
        if token.folded in CHANGE_WORDS:
            return True
    return False


def _after_the_last_correction(tokens: Sequence[Token], spans: Sequence[Span],
                               contrast_anywhere: bool = False) -> List[Span]:
    """Of values of one kind said on both sides of a correction, the later ones: the earlier
    were taken back ("900 Euro. Ach nee, sagen wir lieber 1200" is 1200)."""
    spans = sorted(spans, key=lambda span: span.start)
    for k in range(len(spans) - 1, 0, -1):
        if _correction_before(tokens, spans[k - 1].end, spans[k].start, contrast_anywhere):
            return spans[k:]
    return spans


def _corrected_amounts(tokens: Sequence[Token], money: Sequence[Span], taken: set, known: bool = False,
                       said: AbstractSet[Any] = frozenset()) -> List[Span]:
    """A bare number said as a correction of an amount before it is an amount too: "2000
    euro, anzi facciamo 2500", "orçamento 3000 dólares... melhor 3500"; with ``known`` (an
    amount was given before), one right after a word of change: "y súbelo a 700". ``said``:
    the amounts given so far, which one is said against ("2500 not 2000")."""
    if not money and not known:
        return []
    first_end = min(span.end for span in money) if money else 0
    return [Span("money", index, index + 1, parse_number(token.folded)) for index, token in enumerate(tokens)
            if index >= first_end and token.shape == "number" and index not in taken
            and _number_or_none(token.folded) is not None
            and not (index + 1 < len(tokens) and tokens[index + 1].folded in TIME_UNITS)
            and _changed_by(tokens, index, said)
            and not any(span.start <= index < span.end for span in money)]


def _changed_by(tokens: Sequence[Token], index: int, said: AbstractSet[Any] = frozenset()) -> bool:
    """Is the bare number at ``index`` what a correction right before it sets: a word of
    change or preference ("mets plutôt 2500", "anzi facciamo 2500", "make it 700", "y súbelo
    a 700") or a "no" that stands alone ("no wait, 1200.", "anzi no, 1.350"), with nothing
    between but marks, links and small words? Not a count ("actually we are 4", "but we
    are 3", "no, 3 kids"): nothing but a mark, a link, the end, or a number it is said against
    may follow it."""
    after = tokens[index + 1] if index + 1 < len(tokens) else None
    denies = (after is not None and after.folded in NEGATING and index + 2 < len(tokens)   # "2500 not 2000"
              and tokens[index + 2].shape == "number" and _number_or_none(tokens[index + 2].folded) in said)
    if after is not None and after.shape != "mark" and after.folded not in LEADS_OR_LINKS and not denies:
        return False
    before, filler = index - 1, False
    while before >= 0:
        token = tokens[before]
        if _is_a_lone_no(tokens, before):
            return True   # "no, 1200", "no wait, 1200"
        if token.folded in CHANGES | PREFERENCES:
            return True
        if token.shape != "mark" and token.folded not in SMALL_BEFORE_A_NUMBER:
            break
        filler = filler or token.folded in CORRECTION_FILLERS
        before -= 1
    # Said against an amount given before ("wait, 2500 not 2000"), or after a filler of
    # correction alone, an amount-sized number that is no year: "in realtà 6500, ho
    # ricontrollato" (not "actually 4", "actually 2027").
    number = _number_or_none(tokens[index].folded) or 0
    starts = before < 0 or _is_break(tokens, before)
    return denies or (filler and starts and number >= LISTED_AMOUNT_MIN and not YEAR_MIN <= number <= YEAR_MAX)


def _follows_closely(tokens: Sequence[Token], after: int, index: int) -> bool:
    """Only marks, contrast words and fillers between: "Paris — Lyon", "Nice, plutôt Cannes",
    "Not Paris France lol, Paris, Texas"."""
    between = tokens[after:index]
    return len(between) <= 3 and all(t.shape == "mark" or t.folded in CONTRASTS | CORRECTION_FILLERS | NON_ANSWERS
                                     for t in between)


def _span_text(tokens: Sequence[Token], start: int, end: int, text: Optional[str] = None) -> str:
    text = text if text is not None else getattr(tokens, "text", "")
    if not text:
        return " ".join(token.text for token in tokens[start:end])
    return text[tokens[start].start:tokens[end - 1].end]


def find_words(tokens: Sequence[Token], value: Any) -> List[int]:
    """Where the words of ``value`` stand in a row in the message (token indexes)."""
    wanted = _wanted_words(str(value))
    if not wanted:
        return []
    tokens = tokens if isinstance(tokens, Tokens) else Tokens(tokens)
    where = tokens.where
    first = where.get(wanted[0])
    near = where.get("~" + wanted[0][:5]) if len(wanted[0]) >= 5 else None
    if not first and not near:   # the common case: a table's word the message does not hold
        return []
    words = tokens.words
    starts = set(first or ()) | set(near or ())
    return [words[position][0] for position in sorted(starts) if position + len(wanted) <= len(words) and all(
        _same_word(words[position + k][1].folded, wanted[k]) or words[position + k][1].folded.startswith(wanted[k] + "-")
        for k in range(len(wanted)))]


@lru_cache(maxsize=4096)   # the same table words and values, message after message
def _wanted_words(text: str) -> Tuple[str, ...]:
    """The folded words find_words looks for, in order ("mid-October" is one word)."""
    return tuple([token.folded for token in tokenize(text) if token.shape != "mark"] if "-" in text
                 else [_fold(word) for word in re.findall(r"[^\W_]+", text)])


def _index_keys(phrase: Any) -> Optional[Tuple[str, str]]:
    """The keys of Tokens.where under which find_words looks for the phrase's first word, or
    None when it has no words: a table looked through for every message checks these first."""
    wanted = _wanted_words(str(phrase))
    if not wanted:
        return None
    return wanted[0], ("~" + wanted[0][:5] if len(wanted[0]) >= 5 else wanted[0])


def alternatives_to(tokens: Sequence[Token], index: int, size: int) -> List[str]:
    """The other values offered beside the one at ``index``: "Sydney or Melbourne" gives
    Melbourne for Sydney; "Lima o a Cusco" gives Cusco; none when it stands alone."""
    def option_at(position: int) -> Optional[str]:
        token = tokens[position]
        if (token.capitalised != tokens[index].capitalised or token.shape != tokens[index].shape
                or token.folded in NEVER_OPTIONS):
            return None
        end = _name_end(tokens, position, frozenset()) if token.capitalised else position + 1
        return _span_text(tokens, position, max(end, position + 1))
    found = []
    after = index + size
    if after < len(tokens) and tokens[after].folded in ALTERNATIVES:
        rest = [k for k in range(after + 1, min(len(tokens), after + 4))
                if tokens[k].folded not in LEADS_OR_LINKS]
        found += [option_at(rest[0])] if rest else []
    before = index - 1
    while before >= 0 and tokens[before].folded in LEADS_BEFORE_AN_OPTION:
        before -= 1
    if before >= 1 and tokens[before].folded in ALTERNATIVES:
        start = before - 1
        while start > 0 and tokens[start - 1].capitalised and tokens[start].capitalised:
            start -= 1
        found += [option_at(start)]
    return [option for option in found if option]


####################################################################################
# Reading: the floor (no LLM) and the LLM on top of it
####################################################################################

EXTRACTION_PROMPT = """\
You read one chat message and pull out the values it states for the inputs of a workflow.

Workflow "{name}": {description}

Inputs (JSON keys), with what they mean and what they are used for:
{inputs}
{context}
Rules:
- Extract only what the user states in the NEW message (the last message). Earlier turns are \
context only, to understand it; never take values from them.
- Never invent, guess or fill in placeholders. If the new message does not state a value, use null.
- Copy values in the user's words; do not convert units, currencies or dates.
- "intent" is what the user is doing: "provide" (giving values), "correct" (changing a value \
given before), "cancel" (stop or start over), "skip" (wants to leave an optional input out), \
or "other" (anything else).
{single_call_rule}
Answer with one JSON object and nothing else: {{"values": {{{keys}}}, "intent": "provide"{question_key}}}"""

SINGLE_CALL_RULE = """- "question": if a required input is still missing after this message (neither known so far \
nor stated in it), one short, natural question in the language of the new message that \
acknowledges what it gave and asks for what is still missing, with no lists or forms; \
otherwise null.
"""


@dataclass(init=False)
class Reading:
    """What the deterministic reader found: candidates per input, by strength (3: a
    ``name: value`` line, 2: the answer to the question just asked, 1: a typed span)."""
    candidates: Dict[str, Dict[int, List[Any]]] = field(default_factory=dict)
    ruled_out: Dict[str, List[Any]] = field(default_factory=dict)   # what the message negates
    polarity: Dict[str, bool] = field(default_factory=dict)         # booleans the message states
    text: str = ""                                                  # the message as read (user_words)
    label_lines: int = 0                                            # how many ``name: value`` lines it has

    def __init__(self, **given: Any) -> None:
        # Made for every message: cheaper than the dataclass's __init__ (see Extraction's).
        self.candidates = {}; self.ruled_out = {}; self.polarity = {}
        if given:
            _set_fields(self, given)

    @cached_property
    def tokens(self) -> Tokens:
        """The message's tokens, made once, and only when a part of the reader needs them: a
        message of ``name: value`` lines, with no yes/no to read, is read without them."""
        return tokenize(self.text)

    def add(self, name: str, strength: int, raw: Any) -> None:
        self.candidates.setdefault(name, {}).setdefault(strength, []).append(raw)


def prepare_reader(workflow: Workflow) -> None:
    """Read one message with ``workflow``'s reader, at start-up: the patterns it makes for the
    workflow's labels are compiled on the first message that needs them (about 90 ms for the
    shipped trip planner, most of it the classes of accented letters), and the first user would
    wait for that: a new server's first streamed turn showed its first byte after 90 ms, and
    after 2 ms once this had run (bench/, the latency figure's fake LLM)."""
    read_floor(workflow, Conversation("start-up", workflow.name), "…")


def read_floor(workflow: Workflow, conversation: Conversation, text: str,
               history: Sequence[dict] = ()) -> Tuple[Extraction, Reading]:
    """The deterministic reader, which always runs, with or without an LLM: ``name: value`` lines, labels
    followed by a value, the reply to the one input just asked for, and typed spans
    (amounts, periods, years, names after a place word or a cue, choices, yes/no topics)
    assigned to inputs by their kind. One candidate for an input is accepted; competing
    ones are asked about; what the message rules out is never taken. ``text`` is the message
    as sent: it is cleaned here, once (user_words), and ``reading.tokens.text`` is what was read."""
    long = len(text) > READ_MAX_CHARS
    sent = text
    text, rules_out = _user_words(text, history)
    # Once: the cancel words and the labelled numbers are both found in it. (An ASCII text's fold
    # is its casefold, _fold's common case, made here without a call.)
    folded = text.casefold() if text.isascii() else _fold(text)
    extraction = Extraction()   # intent "provide" (a keyword argument costs as much as setting the field)
    if folded.isascii():
        opening = folded[:1]   # (no letter or digit, or one a cancel phrase opens with: the pattern decides)
        cancel = (opening in ASCII_CANCEL_INITIALS or not opening.isalnum()) and ASCII_CANCEL_PATTERN.match(folded)
    else:
        cancel = CANCEL_PATTERN.match(folded)
    if cancel:
        extraction.intent = "cancel"
    if long:
        extraction.notes.append(LONG_MESSAGE_NOTE)
    reading = Reading()
    reading.text = text   # (set, not given: a keyword argument costs more than the field)
    if extraction.intent == "cancel":
        return extraction, reading
    _read_labels(workflow, text, folded, reading)
    labelled = bool(reading.candidates)
    if _spans_change_nothing(workflow, text, reading, rules_out):   # "word: hello\ncount: 3"
        booleans = _boolean_inputs(workflow)
        if booleans:   # (no topic to read in a workflow without a yes/no input)
            _read_topics(booleans, conversation, reading)
    else:
        _read_spans(workflow, conversation, text, reading)
    if not labelled:   # the answer to the question just asked, unless the message is a sentence of
        for name, raw in _direct_reply(workflow, conversation, text, reading.tokens).items():   # several values
            gives_others = bool(reading.candidates.keys() - {name})
            phrase = input_kind(workflow.query_inputs[name]) in ("place", "text") and len(str(raw).split()) > 1
            if phrase and name in reading.candidates:
                continue   # "weather in lyon", asked which city: the place read in it, not the whole reply
            if not gives_others or (name not in reading.candidates and not phrase):
                reading.add(name, 2, raw)
    if ">" in sent:   # every quoted line has one: most messages have none (no call to find so)
        for name, value in _quoted_label_lines(workflow, sent, history).items():
            if name not in reading.candidates and name not in conversation.values:
                reading.add(name, 1, value)   # only where the user's own words give nothing
    _choose(workflow, reading, extraction)
    return extraction, reading


def _quoted_label_lines(workflow: Workflow, text: str, history: Sequence[dict]) -> Dict[str, str]:
    """The ``label: value`` lines of a quoted block ("> Ziel: Kopenhagen") that the user
    pastes as their own data ("Hier die Eckdaten aus unserer Mail:"), by input; never a line
    of one of our replies. They are context for everything else, and weaker than the user's
    own words: read_floor takes them only for inputs those leave open."""
    found: Dict[str, str] = {}
    if ">" not in text:
        return found
    ours = _our_replies(history)
    for line in INVISIBLE_PATTERN.sub("", within_reading_limit(text)).split("\n"):
        quoted = re.match(r"\s*>[>\s]*(.*)", line)
        labelled = quoted and LINE_VALUE_PATTERN.fullmatch(quoted.group(1))
        if not labelled or not re.search(r"\w", labelled.group(2)) or any(
                " ".join(_fold(quoted.group(1)).split()) in reply for reply in ours):
            continue   # nor a form's empty line ("> destination: ...")
        name = _input_named(workflow, labelled.group(1))
        if name and name not in found:
            found[name] = _line_value(workflow, name, labelled.group(2))
    return found


# Words without which no span of a message is ruled out (is_negated, _corrects, _retracted, EXCESS).
RULING_OUT_WORDS = NEGATIONS | NEGATING | EXCEPTS | EXCESS | PREFERENCES
RULING_OUT_PATTERNS = ascii_token_patterns(RULING_OUT_WORDS)
RULING_OUT_NUMBER_PATTERNS = ascii_token_patterns(word for word in RULING_OUT_WORDS if word.isdigit())   # ("0")
# In " " + an ASCII text lower-cased, a number word (the group "number": what ASCII_NUMBER_WORD_START
# finds) or a ruling-out word of letters (what RULING_OUT_PATTERNS find but the numbers): two searches
# of every message made as one (_in_digits), which in the common message, with neither, rules out both.
ASCII_CUE_PATTERN = re.compile(ascii_cue_pattern(RULING_OUT_WORDS))


def _spans_change_nothing(workflow: Workflow, text: str, reading: Reading, rules_out: Optional[bool] = None) -> bool:
    """Whether reading typed spans could change nothing: the message is only ``name: value``
    lines, every input has one, and no word rules anything out. Spans then add only weaker
    candidates than the lines' (never chosen), so only the yes/no topics are read (_read_topics).
    ``rules_out``: whether RULING_OUT_PATTERNS find a word of letters in the text, when _user_words found so."""
    if len(reading.candidates) < len(workflow.query_inputs):
        return False
    lines = text.splitlines()
    # Each ``name: value`` line has a letter on a line of its own: never more of them than lines
    # that are not blank, which need counting only when some line is not one of them.
    if reading.label_lines != len(lines) and reading.label_lines != len([line for line in lines if line.strip()]):
        return False
    if text.isascii() and not rules_out:   # the common case, found without the tokens
        lowered = " " + text.lower()   # as RULING_OUT_PATTERNS are searched
        # (with rules_out False, only the numbers are left to look for)
        for pattern in RULING_OUT_PATTERNS if rules_out is None else RULING_OUT_NUMBER_PATTERNS:
            if pattern.search(lowered):
                break
        else:
            return True
    return RULING_OUT_WORDS.isdisjoint([token.folded for token in reading.tokens])


def _read_topics(booleans: Sequence[QueryInput], conversation: Conversation, reading: Reading) -> None:
    """What _read_spans finds that a message of ``name: value`` lines can still need: the
    yes/no an input's topic words state, which an LLM's reading is checked against.
    ``booleans``: the workflow's yes/no inputs (_boolean_inputs)."""
    changing = bool(booleans) and asks_a_change(reading.tokens)   # asked only where a yes/no can be read
    for query in booleans:
        if query.name not in conversation.values or changing:
            _read_polarity(reading.tokens, query, reading)


def _boolean_inputs(workflow: Workflow) -> Tuple[QueryInput, ...]:
    """The workflow's yes/no inputs, found once per workflow."""
    found = workflow.derived.get("boolean_inputs")
    if found is None:
        found = workflow.derived["boolean_inputs"] = tuple(
            query for query in workflow.query_inputs.values() if query.type == "boolean")
    return found


def _read_labels(workflow: Workflow, text: str, folded: str, reading: Reading) -> None:
    """``name: value`` lines, and a value right after a label: "budget 2000", "destination
    Paris". For a number, the number right after its label: "budget: 1500, and we might
    spend 2000 on flights" is 1500. ``folded`` is _fold(text): numbers are ASCII, so found in
    the folded text they read the same. The count of ``name: value`` lines is kept on the reading."""
    which = 0 if folded.isascii() else 1
    numbers = {}
    for name, patterns in _labelled_number_patterns(workflow).items():
        match = patterns[which].search(folded)
        # (patterns[2]: the input has a maximum, which a number reached through a link may be above)
        if match and not (patterns[2] and _linked_out_of_bounds(workflow.query_inputs[name], match)):
            numbers[name] = match.group(1)
    lines = LINE_VALUE_PATTERN.findall(text)
    reading.label_lines = len(lines)
    own_names = _inputs_named_by_own_name(workflow)   # the commonest labels, as _input_named finds them first
    # _line_value cuts a value only at a mark that ends a sentence or parts of a list: a text
    # with none of them has no value to cut, and no call to find so.
    cuttable = "." in text or "!" in text or "," in text or ";" in text
    candidates = reading.candidates
    for key, value in lines:
        name = own_names[key] if key in own_names else _input_named(workflow, key)
        if name in numbers:   # "count: 3": the number after the label, whatever follows it on the line
            value = numbers[name]
        elif name:   # the marks of a quotation the line was in are not the value's: "When: 3-9 March""
            value = value.strip(QUOTATION_MARKS) or value
            if cuttable:
                value = _line_value(workflow, name, value)
        else:
            continue
        candidates.setdefault(name, {}).setdefault(3, []).append(value)   # reading.add, without a call a line
    if len(reading.candidates) == len(workflow.query_inputs):   # the lines gave every input a value:
        return                                                   # none to look for after its label
    for query in workflow.query_inputs.values():
        if query.name in reading.candidates:
            continue
        if query.name in numbers:
            reading.add(query.name, 3, numbers[query.name])
        elif query.type in STRING_TYPES:
            found = _labelled_phrase(query, text, _label_patterns(workflow, query)[1:])
            if found and input_kind(query) == "date":   # "Zeitraum: Ostern, 10 Tage": the whole period
                found = _period_from(reading.tokens, found)
            if found:
                reading.add(query.name, 3, found)


def _line_value(workflow: Workflow, name: str, value: str) -> str:
    """What a ``label: value`` line gives its input: its first sentence, up to another input's label."""
    if "." in value or "!" in value:
        value = _first_sentence(value)
    if "," in value or ";" in value:
        value = _before_another_label(workflow, name, value)
    return value   # the common value ("3", "Paris"): nothing to cut, and no call to find so


def _before_another_label(workflow: Workflow, name: str, value: str) -> str:
    """A line's value up to the comma before another input's label: "3-9 mars, budget 1200"
    is "3-9 mars", "Berlin, Einheiten: Fahrenheit" is "Berlin"."""
    if "," not in value and ";" not in value:   # the common line: nothing to split, nothing to look up
        return value
    parts = re.split(r"([,;])", value)
    for k in range(2, len(parts), 2):
        words = parts[k].split()
        if any(_input_named(workflow, " ".join(words[:size]).rstrip(":=")) not in (None, name)
               for size in range(1, min(MAX_LABEL_WORDS, len(words)) + 1)):
            return "".join(parts[:k - 1]).rstrip() or value
    return value


def _first_sentence(value: str) -> str:
    """A line's value up to the end of its first sentence, without that sentence's full stop
    ("Ostern, 10 Tage. Budget 2800 €." is "Ostern, 10 Tage"); an abbreviation's dot ("St.
    Louis", "Washington D.C.") or a number's ("3.–10. Juni") ends nothing."""
    if "." not in value and "!" not in value:   # the common value ("3", "Paris"): no mark that ends a sentence
        return value
    for end in SENTENCE_END_PATTERN.finditer(value):
        if not NO_SENTENCE_END_BEFORE_PATTERN.search(value, 0, end.start()):
            return value[:end.start()].rstrip() or value
    return value


def _period_from(tokens: Sequence[Token], phrase: str) -> str:
    """The period that a labelled phrase opens, with the parts close after it in its sentence
    (as _read_period joins them), when it goes on past the phrase's punctuation."""
    periods = period_spans(tokens)
    for k, span in enumerate(periods):
        if not _span_text(tokens, span.start, span.end).startswith(phrase):
            continue
        end = span.end
        for following in periods[k + 1:]:
            gap = tokens[end:following.start]
            if len(gap) > 3 or any(token.capitalised or token.text in ".!?\n" for token in gap):
                break
            end = following.end
        text = _span_text(tokens, span.start, end)
        return text if len(text) > len(phrase) else phrase
    return phrase


def _linked_out_of_bounds(query: QueryInput, match: "re.Match[str]") -> bool:
    """Is a number its label reaches through a link word above the input's maximum, so the
    link is of something else: "the first month of 2027" names no month 2027. (One below the
    minimum is refused with the reason: "a budget of -5".)"""
    if query.maximum is None:   # the common case: no bound to be out of
        return False
    number = _number_or_none(match.group(1))
    linked = bool(set(_words(match.group(0))) & LABEL_LINKS)
    return linked and number is not None and number > query.maximum


def _labelled_number_patterns(workflow: Workflow) -> Dict[str, Tuple["re.Pattern[str]", "re.Pattern[str]", bool]]:
    """Per number input, a label and the number right after it, compiled once per workflow: for
    an ASCII folded text, and for any text; and whether the input has a maximum, without which
    no number is out of bounds (_linked_out_of_bounds, then not called). The first ignores case in the label alone: the words
    of LABELLED_NUMBER are ASCII and lower case, so in an ASCII folded text, lower case too, no
    case to ignore changes what they match (only "ı", "ſ", "K" and "İ" fold onto ASCII letters),
    and the regex engine tries the words of a case it ignores one by one, without its quick look."""
    found = workflow.derived.get("labelled_numbers")
    if found is None:
        found = workflow.derived["labelled_numbers"] = {}
        for query in workflow.query_inputs.values():
            if query.type in NUMERIC_TYPES:
                labels = _label_patterns(workflow, query)
                label = r"\b(?:" + "|".join(labels) + r")"
                found[query.name] = (re.compile(_ascii_label_pattern(labels) + LABELLED_NUMBER),
                                     re.compile(label + LABELLED_NUMBER, re.I), query.maximum is not None)
    return found


def _ascii_label_pattern(labels: List[str]) -> str:
    """The labels as found in an ASCII folded text. When each is one ASCII word (the common
    label: "count", "budget"), the word comes first and the word boundary before it is looked
    back at once it is found: case ignored or not, the folded words match the same lower-case
    letters, and the regex engine then looks for the words' letters, not at every character."""
    if all(label.isascii() and re.fullmatch(r"\w+", label) for label in labels):
        return "(?:" + "|".join(rf"{label}(?<!\w{label})" for label in labels) + ")"
    return r"(?i:\b(?:" + "|".join(labels) + r"))"


def _label_patterns(workflow: Workflow, query: QueryInput) -> List[str]:
    """How a label of this input is written: its own words, or a word of its kind in any
    language when no other input has that kind ("orcamento: 2500" is the budget). Worked out
    once per input."""
    known = workflow.derived.setdefault("label_patterns", {})
    if query.name not in known:
        known[query.name] = _label_patterns_of(workflow, query)
    return known[query.name]


def _label_patterns_of(workflow: Workflow, query: QueryInput) -> List[str]:
    # The label in every language the workflow gives, since the templated questions show them.
    labels = dict.fromkeys([query.label, *(text.label for text in query.translations.values() if text.label)])
    patterns = [r"[\s_-]+".join(map(re.escape, _words(label))) for label in labels]
    kind = input_kind(query)
    if kind in KINDS and sum(input_kind(other) == kind for other in workflow.query_inputs.values()) == 1:
        patterns += [re.escape(word) for word in sorted(KINDS[kind])]
        if kind == "money":   # the head of a compound: "Gesamtbudget 1500", "Reisebudget: 2000"
            patterns += [r"[^\W\d_]+" + re.escape(word) for word in sorted(COMPOUND_LABEL_HEADS)]
    return patterns


def asks_a_change(tokens: Sequence[Token]) -> bool:
    """Does the message correct or change something said before: "make it", "rather",
    "anzi no", "Ah non pardon"? Then every input is read as if it were still open."""
    words = [token for token in tokens if token.shape != "mark"]
    return any(token.folded in CHANGE_WORDS for token in words) or (
        len(tokens) > 1 and tokens[0].folded in NEGATING and tokens[1].shape == "mark")


def _read_spans(workflow: Workflow, conversation: Conversation, text: str, reading: Reading) -> None:
    """Typed spans, each given to the input of its kind. Inputs already known take a new value
    only from their cues or a replaced name ("now do it for Rome", "not Paris — Lyon")."""
    tokens = reading.tokens
    kinds = {query.name: input_kind(query) for query in workflow.query_inputs.values()}
    past = _context_tokens(tokens)   # "last year in Paris we spent 3000 euros": no value of this trip
    changing = asks_a_change(tokens)
    money = [span for span in money_spans(text, tokens) if span.start not in past]
    if changing:   # "make it naples instead, rome is too crowded in summer": no dates (amounts stay:
        past = past | _clauses_of_the_replaced(tokens, conversation)   # "2000 euros for Rome please")
    rates = {id(span): _rate_end(tokens, span.end) for span in money}   # "50 euros a night" is no total
    money_tokens = {index for span in money for index in range(span.start, rates[id(span)] or span.end)}
    money = [span for span in money if not rates[id(span)]]
    reading.ruled_out.update({query.name: [span.value for span in money if span.negated]
                              for query in workflow.query_inputs.values() if kinds[query.name] == "money"})
    money = [span for span in money if not span.negated]
    joined = {k for start, end in _name_runs(tokens, words_taken(workflow)) if end - start > 2
              for k in range(start, end)}   # "Rio de Janeiro" holds no month
    places = [query for query in workflow.query_inputs.values() if kinds[query.name] == "place"]
    lowercase: List[Span] = []   # "will nach rio de janeiro!!!": the workflow's one place, written in lower case
    if len(places) == 1 and (places[0].name not in conversation.values or changing):
        needed = [query for query in workflow.query_inputs.values() if not query.optional]
        lowercase = [span for span in _lowercase_places(tokens, known_words(workflow), money_tokens,
                                                        _cue_pairs(places[0]), any_lead=needed == places,
                                                        asked=conversation.asked == [places[0].name])
                     if span.start not in past]
        joined |= {k for span in lowercase for k in range(span.start, span.end)}
    periods = [_without(tokens, span, joined) for span in period_spans(tokens)
               if not money_tokens & set(range(span.start, span.end)) and span.start not in past]
    periods = [span for span in periods if span is not None]
    taken_tokens = money_tokens | {index for span in periods for index in range(span.start, span.end)}
    labels = {_coerce_or_none(query, raw) for query in workflow.query_inputs.values() if kinds[query.name] == "money"
              for raw in reading.candidates.get(query.name, {}).get(3, [])}   # "orçamento 3000, melhor 3500"
    labelled = [Span("money", index, index + 1, _number_or_none(token.folded)) for index, token in enumerate(tokens)
                if token.shape == "number" and _number_or_none(token.folded) in labels] if labels else []
    amount_known = not money and any(kinds[name] == "money" for name in conversation.values if name in kinds)
    # "1800 €, ah non, mets plutôt 2500", "orçamento 3000, melhor 3500", "y súbelo a 700"
    known_amounts = {value for name, value in conversation.values.items() if kinds.get(name) == "money"}
    corrected = _corrected_amounts(tokens, money + labelled, taken_tokens | past, known=amount_known,
                                   said=known_amounts | {span.value for span in money + labelled})
    money += corrected + [span for span in labelled if span.start not in money_tokens]
    money_tokens |= {span.start for span in corrected}
    taken_tokens |= money_tokens
    for query in workflow.query_inputs.values():
        kind, is_open = kinds[query.name], query.name not in conversation.values or changing
        # A message that is only a period gives the dates again, as a choice alone does ("deux
        # semaines en juillet" after "cet été").
        is_open = is_open or (kind == "date" and _only_a_period(tokens, periods))
        if query.type in STRING_TYPES and kind in ("place", "text"):
            leads = query.derived.get("cue_leads")
            if leads is None:   # the last word of each cue, once per input
                leads = query.derived["cue_leads"] = frozenset(_fold(cue).split()[-1] for cue in query.cues)
            only_place = kind == "place" and len(places) == 1
            if only_place:   # the workflow's one place: "a trip to Rome", "rather Rome", "I want Rome", "facciamo Napoli"
                leads |= PLACE_LEADS | PREFERENCES | WISHES | CHANGES
            spans = [span for span in name_spans(tokens, leads, words_taken(workflow), alone=only_place and is_open,
                                                 listing=bool(money or periods)) if span.start not in past]
            if only_place and is_open and not spans:   # "rome, 1200 eur, 5 days in june", "going to lyon"
                valued = {k for span in money + periods for k in range(span.start, span.end)}
                spans = _lowercase_list_head(tokens, known_words(workflow), valued) or lowercase
            if query.name in conversation.values:   # "mejor Córdoba, Granada ya la conozco": Granada is no region
                spans = [_without_the_known(tokens, span, conversation.values[query.name]) for span in spans]
            reading.ruled_out.setdefault(query.name, []).extend(span.value for span in spans if span.negated)
            # A name ruled out where it is written again, in any case: "a week in Paris? forget paris".
            reading.ruled_out[query.name].extend(span.value for span in spans if not span.negated and any(
                is_negated(tokens, again) for again in find_words(tokens, span.value) if again != span.start))
            for span in _after_the_last_contrast(tokens, [span for span in spans if not span.negated]):
                if is_open or _cued(tokens, span, query) or _replaces(tokens, span):
                    for name in [span.value] + alternatives_to(tokens, span.start, span.end - span.start):
                        reading.add(query.name, 1, name)   # "nach Norwegen oder Schweden": which one?
        if query.type == "choice" and not is_open:
            _read_choice(workflow, tokens, query, reading, changing=True, context=past)   # "make it packed"
        if not is_open:
            continue
        if kind == "money":
            asked = conversation.asked == [query.name]
            listed = (_listed_amount(tokens, taken_tokens | past, asked) if asked or periods else [])   # "2000" alone: no
            for span in (_take_corrected(reading, query.name, tokens, money, contrast_anywhere=True)
                         or _limited_amount(tokens, taken_tokens | past)   # not "el año pasado fui con 880 €"
                         or listed):
                reading.add(query.name, 1, span.value)
        elif kind == "date":
            _read_period(tokens, text, periods, query, reading)
        elif kind == "year":
            years = [Span("year", index, index + 1, int(token.folded)) for index, token in enumerate(tokens)
                     if token.shape == "number" and index not in money_tokens and re.fullmatch(r"\d{4}", token.folded)]
            years += [Span("year", index, index + 1, CENTURY_OF_SHORT_YEARS + int(token.folded))
                      for index, token in enumerate(tokens)
                      if index and tokens[index - 1].text in "'’" and re.fullmatch(r"\d{2}", token.folded)]   # "march '27"
            for year in {span.value for span in _take_corrected(reading, query.name, tokens, years)}:
                reading.add(query.name, 1, year)
        elif kind in TYPED_VALUE_PATTERNS:
            found = TYPED_VALUE_PATTERNS[kind].findall(text)
            if len(found) == 1:
                reading.add(query.name, 1, found[0])
        elif query.type == "choice":
            _read_choice(workflow, tokens, query, reading, context=past)
        elif query.type == "boolean":
            _read_polarity(tokens, query, reading, context=past)
        elif query.type in NUMERIC_TYPES and query.synonyms:
            named = _synonym_spans(tokens, query) or _ordinal_spans(tokens, kind)   # "June, my first month at ..."
            reading.ruled_out.setdefault(query.name, []).extend(span.value for span in named if span.negated)
            for value in {span.value for span in _take_corrected(reading, query.name, tokens,
                                                                   [s for s in named if not s.negated])}:
                reading.add(query.name, 1, value)
    _read_bounded_number(workflow, conversation, tokens, taken_tokens, reading)


def _only_a_period(tokens: Sequence[Token], periods: Sequence[Span]) -> bool:
    """Is the message one period and nothing else, marks and the word leading into it aside?"""
    if len(periods) != 1:
        return False
    span = periods[0]
    return not any(token.shape != "mark" and not (index < span.start and _leads_into_period(tokens, index))
                   for index, token in enumerate(tokens) if not span.start <= index < span.end)


def _limited_amount(tokens: Sequence[Token], taken: set) -> List[Span]:
    """A bare number with a word that makes it the most to spend ("1000 max", "max. 800"), or
    after one that brings it ("viaje a Lima en junio con 1500")."""
    found: List[Span] = []
    if isinstance(tokens, Tokens) and LIMITS.isdisjoint(tokens.where) and AMOUNT_LEADS.isdisjoint(tokens.where):
        return found
    for index, token in enumerate(tokens):
        if token.shape != "number" or index in taken or (_number_or_none(token.folded) or 0) < LISTED_AMOUNT_MIN:
            continue   # "max 1.2.3" is no number, "kids max 2" no budget
        following = tokens[index + 1] if index + 1 < len(tokens) else None
        after = following is not None and (following.folded in LIMITS or (   # "1600 in totale", "2000 au total"
            following.folded in TIME_LINKS | ARTICLES and index + 2 < len(tokens) and tokens[index + 2].folded in LIMITS))
        previous = index - 2 if index >= 2 and tokens[index - 1].text in ".:" else index - 1   # "max. 800"
        led = previous >= 0 and tokens[previous].folded in AMOUNT_LEADS and (   # "con 1500", not "con 150 alumnos"
            (_number_or_none(token.folded) or 0) >= AMOUNT_LEAD_MIN and not _clause_is_question(tokens, index))
        before = previous >= 0 and (tokens[previous].folded in LIMITS or led) and (
            following is None or following.shape == "mark" or following.folded in CURRENCIES)   # not "max 3 nights"
        if after or before:
            found.append(Span("money", index, index + 1, parse_number(token.folded)))
    return found if len(found) == 1 else []


def _listed_amount(tokens: Sequence[Token], taken: set, asked: bool) -> List[Span]:
    """A bare number that is an item of its own in a message that also gives a period ("Prague,
    1200, 12/07-19/07", "nach Südtirol, in den Pfingstferien, 3000"), or in the reply to the amount's
    question ("1500, last two weeks of june"), is the amount, when it is the only one. In a list
    it must be LISTED_AMOUNT_MIN or more: smaller bare numbers are counts as often as amounts."""
    found = [Span("money", index, index + 1, parse_number(token.folded)) for index, token in enumerate(tokens)
             if token.shape == "number" and index not in taken and _number_or_none(token.folded) is not None
             and (index == 0 or _is_break(tokens, index - 1))
             and (index + 1 == len(tokens) or _is_break(tokens, index + 1)) and not _is_a_periods_year(tokens, index, taken)]
    if len(found) != 1 or not (asked or found[0].value >= LISTED_AMOUNT_MIN):
        return []
    return found


def _is_a_periods_year(tokens: Sequence[Token], index: int, taken: set) -> bool:
    """Is the number at ``index`` a year right after a period ("Berlin in July, 2026",
    "Berlin, 10 days, 2026"), not an amount?"""
    if not YEAR_MIN <= (_number_or_none(tokens[index].folded) or 0) <= YEAR_MAX:
        return False
    before = index - 1
    while before >= 0 and tokens[before].shape == "mark":
        before -= 1
    return before >= 0 and (before in taken or _is_time_word(tokens[before], tokens, before))


def _synonym_spans(tokens: Sequence[Token], query: QueryInput) -> List[Span]:
    """Where a number input's synonyms are named: the author's as written ("May", not "may"),
    and the tables' month names long enough to be no other word ("março"); "not July" is
    ruled out."""
    spans = []
    written = {synonym for synonym, _ in query.synonyms}
    from_tables = dict(synonyms_read(query)[len(query.synonyms):])
    months = query.derived["month_values"]
    for index, token in enumerate(tokens):
        raw = token.text if token.text in written else from_tables.get(token.folded)
        following = tokens[index + 1] if index + 1 < len(tokens) else None
        if raw is None and token.folded in MONTHS and following is not None and (
                re.fullmatch(r"\d{4}", following.folded) or following.text in "'’" or following.shape == "ordinal"):
            raw = months.get(MONTHS[token.folded])   # a short name or another word before its year or day: "feb 1st"
        if raw is not None:
            spans.append(Span("number", index, index + 1, raw, is_negated(tokens, index)))
    return spans


def _ordinal_spans(tokens: Sequence[Token], kind: str) -> List[Span]:
    """An ordinal before a word of the input's kind: "the 11th month", "il terzo mese"."""
    words = KINDS.get(kind, frozenset())
    spans = []
    for index in range(len(tokens) - 1):
        token = tokens[index]
        if tokens[index + 1].folded in words and (token.shape == "ordinal" or token.folded in ORDINALS):
            value = ORDINALS.get(token.folded) or int(re.match(r"\d+", token.folded).group(0))
            spans.append(Span("number", index, index + 2, value, is_negated(tokens, index)))
    return spans


def words_taken(workflow: Workflow) -> frozenset:
    """Words that mean something else here, so are never a name: "make it Relaxed" (a pace),
    "how about Fahrenheit" (a unit), "I", "Budget". Worked out once per workflow."""
    taken = workflow.derived.get("words_taken")
    if taken is None:
        taken = workflow.derived["words_taken"] = _words_taken(workflow)
    return taken


def _words_taken(workflow: Workflow) -> frozenset:
    taken = set(SENTENCE_STARTS | YES_OR_NO | COUNT_WORDS | NEGATIONS)
    taken |= CURRENCIES | CONTRASTS | ALTERNATIVES | CANCELS | QUALIFIERS | NON_ANSWERS | CONFIRMATIONS | HEDGES
    taken |= CORRECTION_FILLERS | PREFERENCES | CHANGES | WISHES | STAYS | MOTIONS   # "Honeymoon!! Santorini"
    taken |= RATE_UNITS   # "150 Euro pro Person"
    for query in workflow.query_inputs.values():
        # A cue's words too: "qual a temperatura agora em miami" (cue "temperatura em") names no "temperatura".
        taken |= set(_words(" ".join([query.label, *query.choices, *query.cues])))
        taken |= {word for synonym, _ in query.synonyms for word in _words(str(synonym))}
    return frozenset(taken)


def _without_the_known(tokens: Sequence[Token], span: Span, known: Any) -> Span:
    """The name without the "region" after its comma when that is the value known so far,
    named again: in "mejor Córdoba, Granada ya la conozco" the place is Córdoba."""
    head, comma, region = str(span.value).partition(",")
    if not comma or _fold(region.strip()) != _fold(str(known)):
        return span
    end = next(k for k in range(span.start, span.end) if tokens[k].text == ",")
    return span._replace(end=end, value=head)


def _all_lower_case(tokens: Sequence[Token]) -> bool:
    if isinstance(tokens, Tokens):
        return tokens.all_lower_case
    return not any(token.text[:1].isupper() for token in tokens)


def known_words(workflow: Workflow) -> frozenset:
    """Every word that means something here, the tables' and this workflow's (words_taken):
    a lower-case word of none of them can be a name. Worked out once per workflow."""
    known = workflow.derived.get("known_words")
    if known is None:
        known = workflow.derived["known_words"] = words_taken(workflow) | ALL_WORDS
    return known


def _cued(tokens: Sequence[Token], span: Span, query: QueryInput) -> bool:
    """Is the name right after one of the input's own cues ("now do it for Rome")?"""
    before = " ".join(token.folded for token in tokens[max(0, span.start - 4):span.start])
    return any(before.endswith(" ".join(_words(cue))) for cue in query.cues)


def _replaces(tokens: Sequence[Token], span: Span) -> bool:
    """A name that replaces a ruled-out one: "not Paris — Lyon"."""
    before = span.start - 1
    while before >= 0 and (tokens[before].shape == "mark" or tokens[before].folded in CONTRASTS):
        before -= 1
    return before >= 0 and before < span.start - 1 and tokens[before].capitalised and is_negated(tokens, before)


def _take_corrected(reading: Reading, name: str, tokens: Sequence[Token], spans: Sequence[Span],
                    shown: Callable[[Span], Any] = lambda span: span.value,
                    contrast_anywhere: bool = False) -> List[Span]:
    """The spans an input keeps after the message's last correction of it. What the correction
    takes back is ruled out, a label's value too ("orçamento 3000 dólares... melhor 3500"), and
    what replaces it is as strong as anything else the message gives the input."""
    if len(spans) < 2:
        return list(spans)   # nothing to correct
    spans = sorted(spans, key=lambda span: span.start)
    kept = _after_the_last_correction(tokens, spans, contrast_anywhere)
    if len(kept) == len(spans):
        return kept
    # The one value left, said again after the correction, stands: "maio 2030, não, maio 2032"
    # (not "3000, no, 2000, 3000 is too much").
    again = [shown(kept[0])] if all(shown(span) == shown(kept[0]) for span in kept) else []
    reading.ruled_out.setdefault(name, []).extend(shown(span) for span in spans[:len(spans) - len(kept)]
                                                  if shown(span) not in again)
    strongest = max(reading.candidates.get(name, {1: []}))
    if strongest > 1:
        for span in kept:
            reading.add(name, strongest, shown(span))
    return kept


def _read_period(tokens: Sequence[Token], text: str, periods: Sequence[Span], query: QueryInput,
                 reading: Reading) -> None:
    """One period, in the user's words; parts of it said apart join ("two weeks ... next
    spring"), but periods offered as alternatives ("May or June") compete."""
    kept = [span for span in periods if not span.negated]
    reading.ruled_out.setdefault(query.name, []).extend(_span_text(tokens, s.start, s.end, text)
                                                        for s in periods if s.negated)
    if not kept:
        return
    kept = _take_corrected(reading, query.name, tokens, kept,   # "next weekend ..., make it the weekend after next"
                           lambda span: _span_text(tokens, span.start, span.end, text), contrast_anywhere=True)
    ranges = [span for span in kept if _is_a_day_range(tokens, span)]
    if len(ranges) == 1:
        # A range of days says when and how long: a count or a time beside it says it again
        # ("3 nights, 12/07-15/07", "tre giorni 8-10 dicembre", "de 9 a 16 de fevereiro, depois do carnaval").
        kept = sorted([_without_a_count(tokens, ranges[0])] + [
            span for span in kept if span is not ranges[0] and _names_a_time(tokens, span) and any(
                token.shape in DAY_SHAPES for token in tokens[span.start:span.end])], key=lambda span: span.start)
    if any(alternatives_to(tokens, span.start, span.end - span.start) or
           (span.start >= 1 and tokens[span.start - 1].folded in ALTERNATIVES) for span in kept[1:]):
        for span in kept:
            reading.add(query.name, 1, _span_text(tokens, span.start, span.end, text))
        return
    sentences = _by_sentence(tokens, kept)
    if len(sentences) > 1:   # said in different sentences: different answers, unless one names a time
        naming = [group for group in sentences if any(_names_a_time(tokens, span) for span in group)]
        if len(naming) > 1:
            for group in naming:
                reading.add(query.name, 1, " ".join(_span_text(tokens, s.start, s.end, text) for s in group))
            return
        kept = naming[0] if naming else kept
    if any(_names_a_time(tokens, span) for span in kept):   # "este año ... a finales de agosto": August
        kept = [span for span in kept if _names_a_time(tokens, span) or _counts_a_time(tokens, span)]
    pieces: List[List[int]] = []   # [first token, end token] of each stretch of the message quoted
    for span in kept:
        gap = tokens[pieces[-1][1]:span.start] if pieces else []
        if pieces and len(gap) <= 3 and not any(t.capitalised or t.folded in NEGATIONS for t in gap):
            pieces[-1][1] = span.end   # close together: quoted as written ("noviembre, unos 10 días")
        elif pieces:   # apart: the later part keeps the word that leads into it ("Drei Tage" + "im Mai")
            pieces.append([span.start - 1 if tokens[span.start - 1].folded in TIME_LINKS else span.start, span.end])
        else:
            pieces.append([span.start, span.end])
    parts = [_span_text(tokens, start, end, text) for start, end in pieces]
    reading.add(query.name, 1, " ".join(parts))


DAY_SHAPES = ("number", "ordinal", "dmy", "iso")


def _is_a_day_range(tokens: Sequence[Token], span: Span) -> bool:
    """Does the period name a range of days: two dates ("12/07-15/07"), or two day numbers
    and a month ("8-10 dicembre", "de 9 a 16 de fevereiro")?"""
    inside = tokens[span.start:span.end]
    dates = sum(token.shape in ("dmy", "iso") for token in inside)
    days = sum(token.shape in ("number", "ordinal") for token in inside)
    return dates >= 2 or (days >= 2 and any(token.folded in MONTHS for token in inside))


def _without_a_count(tokens: Sequence[Token], span: Span) -> Span:
    """The range of days without a count that opens its period ("tre giorni 8-10 dicembre")."""
    start = span.start
    if start + 2 < span.end and (tokens[start].shape == "number" or tokens[start].folded in COUNT_WORDS) and \
            tokens[start + 1].folded in TIME_UNITS:
        start += 2
        while start < span.end - 1 and tokens[start].shape == "mark":
            start += 1
    return span._replace(start=start)


def _lowercase_list_head(tokens: Sequence[Token], known: frozenset, valued: set) -> List[Span]:
    """In a message written all in lower case that lists values, its first item when it is one
    to three words that mean nothing else here and the next item is a value (an amount, a
    period): "hamburg. 500 euro", "porto, 400 euros"; not "oii gente, eu e minhas amigas"."""
    if not _all_lower_case(tokens):
        return []
    end = 0
    while end < len(tokens) and tokens[end].shape == "word":
        end += 1
    if not 1 <= end <= 3 or end == len(tokens) or tokens[end].text not in ",;." or any(
            token.folded in known or len(token.folded) < 3 or k in valued for k, token in enumerate(tokens[:end])):
        return []   # "mi-mai, 5 jours" lists two periods
    following = next((k for k in range(end + 1, len(tokens)) if tokens[k].shape != "mark"), None)
    if following is None or following not in valued:   # the next item is itself a value
        return []
    return [Span("name", 0, end, _span_text(tokens, 0, end))]


def _cue_pairs(query: QueryInput) -> frozenset:
    """The last two words of each of an input's cues of two words or more: "make it", "trip to".
    Worked out once per input."""
    pairs = query.derived.get("cue_pairs")
    if pairs is None:
        pairs = query.derived["cue_pairs"] = frozenset(tuple(_fold(cue).split()[-2:]) for cue in query.cues
                                                       if len(cue.split()) >= 2)
    return pairs


def _lowercase_places(tokens: Sequence[Token], known: frozenset, valued: set, cue_pairs: frozenset = frozenset(),
                      any_lead: bool = False, asked: bool = False) -> List[Span]:
    """In a message written all in lower case, the place after going somewhere: "trip to
    lisbon", "jveux aller a lyon", "will nach rio de janeiro!!!", "make it porto"; with
    ``any_lead`` (the place is all the workflow needs), after any place word: "weather in san
    francisco in fahrenheit". The place is right after a place word that follows a word of
    motion, after one of the input's cues, or, in the reply to its question (``asked``), right
    after a word of preference or change, which then wins ("boston. no wait i meant
    providence"). Its extent is _lowercase_name_end's."""
    if not _all_lower_case(tokens):
        return []
    found = []
    for index in range(1, len(tokens)):
        lead = tokens[index - 1].folded in PLACE_LEADS
        after_any_place_word = (any_lead and tokens[index - 1].folded not in ARTICLES   # "qual a temperatura"
                                and not (index >= 2 and tokens[index - 2].folded in PLACE_LEADS))   # "in a bit"
        before = index - 1
        while before > 0 and tokens[before].shape == "mark":
            before -= 1
        preference_of_the_word_before = (tokens[before].folded in PREFERENCES and before + 1 < index and before > 0
                                         and tokens[before - 1].shape == "word")   # "naples instead, rome ..."
        right_after_a_correction = (not preference_of_the_word_before and asked
                                    and tokens[before].folded in (PREFERENCES | CHANGES) - MOTIONS)
        if not ((lead and (after_any_place_word or (index >= 2 and tokens[index - 2].folded in MOTIONS)))
                or right_after_a_correction
                or (index >= 2 and (tokens[index - 2].folded, tokens[index - 1].folded) in cue_pairs)):
            continue
        corrects = right_after_a_correction or any(   # "trip to lisbon, actually make it porto"
            token.folded in CHANGE_WORDS for token in tokens[max(0, index - CORRECTION_LEAD_WORDS):index])
        end = _lowercase_name_end(tokens, index, known, valued)
        if end > index:
            span = Span("name", index, end, _span_text(tokens, index, end), is_negated(tokens, index))
            found.append((corrects, span))
    corrected = [span for corrects, span in found if corrects]
    return corrected[-1:] or [span for _, span in found[:1]]   # the correction's place, or the first


def _lowercase_name_end(tokens: Sequence[Token], index: int, known: frozenset, valued: set,
                        region: bool = True) -> int:
    """Where a lower-case name that starts at ``index`` ends, or ``index`` when none does: one
    word that means nothing else here ("lyon"), after words that start names ("new york",
    "san francisco", "saint louis") and joined to more by a name's joining words ("frankfurt
    am main", "rio de janeiro", "ciudad de mexico"), with its region after a comma ("zürich,
    schweiz"; see _qualified). It must end at a mark, a number or a word
    that means something: of two unknown words in a row, which is the name would be a guess
    ("bilbao prsupuesto")."""
    def unknown(position: int) -> bool:
        token = tokens[position]
        return (token.shape == "word" and token.folded not in known and len(token.folded) >= 3
                and position not in valued)
    end = index
    while end < len(tokens) and tokens[end].folded in NAME_STARTS and end + 1 < len(tokens) and unknown(end + 1):
        end += 1
    joined_start = (end + 2 < len(tokens) and tokens[end].folded in NAME_STARTS
                    and tokens[end + 1].folded in NAME_JOINERS and unknown(end + 2))   # "ciudad de mexico"
    if end >= len(tokens) or not (unknown(end) or joined_start):
        return index
    end += 1
    while end + 1 < len(tokens) and tokens[end].folded in NAME_JOINERS - PLACE_LEADS and (
            unknown(end + 1) or tokens[end + 1].folded in MONTHS):   # "rio de janeiro", not "sevilla en grados"
        end += 2
    if end < len(tokens) and unknown(end):
        return index
    if region and end + 1 < len(tokens) and tokens[end].text == ",":   # "zürich, schweiz", "bogotá, colombia en"
        region_end = _lowercase_name_end(tokens, end + 1, known, valued, region=False)
        if region_end > end + 1 and _is_a_region(tokens, (index, end), (end + 1, region_end)):
            return region_end
    return end


def _without(tokens: Sequence[Token], span: Span, taken: set) -> Optional[Span]:
    """The period without the tokens of a name at its start, nor the word that then leads
    into it ("Janeiro in May" is "May"); None when nothing of a time is left."""
    start = span.start
    while start < span.end and start in taken:
        start += 1
    if start == span.start:
        return span
    while start < span.end - 1 and _leads_into_period(tokens, start):
        start += 1
    rest = span._replace(start=start)
    left_a_time = start < span.end and (_names_a_time(tokens, rest) or _counts_a_time(tokens, rest))
    return rest if left_a_time and not taken & set(range(start, span.end)) else None


def _sentence_of(tokens: Sequence[Token], index: int) -> int:
    return sum(1 for token in tokens[:index] if token.text in ".!?\n")


def _context_tokens(tokens: Sequence[Token]) -> set:
    """The tokens of the parts of sentences whose values are context, not this trip's: the
    parts that tell of the past ("last year", "el año pasado", "letzten Sommer"; not "the
    last week of May"), clauses of why ("por causa dos presentes de natal"), of what others
    said ("me dijeron que es más tranquilo") and of a trip made before ("minha mãe foi para a
    Itália em maio"). A contrast ends the part ("my friend went to
    Paris last year, but I want Athens")."""
    context: set = set()
    periods = period_spans(tokens)
    now = {span.start for span in periods if not _tells_of_the_past(tokens, span)}   # "este año queremos ..."

    def ends_the_part(index: int, at_periods: bool = True) -> bool:
        token = tokens[index]
        return (token.text in ".!?\n" or token.folded in CONTRASTS or (at_periods and index in now)
                or (token.shape == "mark" and unicodedata.category(token.text[0]) == EMOJI_CATEGORY))   # not "€"
    for span in periods:
        if span.start in now:
            continue
        first = span.start
        while first > 0 and not ends_the_part(first - 1):
            first -= 1
        end = span.end
        # A period that ends its clause, not at the sentence's start, ends the part there too:
        # "Mon frère a dépensé 3000 € l'an dernier, moi j'ai 2000 €" (but "Last year, we went to Rome").
        if not (first < span.start and end < len(tokens) and _is_break(tokens, end)):
            while end < len(tokens) and not ends_the_part(end):
                end += 1
        context.update(range(first, end))
    if isinstance(tokens, Tokens) and CONTEXT_OPENERS.isdisjoint(tokens.where):
        return context
    decided = {start for start, _ in _conclusions_in(tokens, 0, len(tokens))}   # "... me dijo, así que Berlín"
    for index, token in enumerate(tokens):
        went = token.folded in WENT
        if token.folded in CONTEXT_OPENERS and (not went or _names_a_place_after(tokens, index)):
            first, end = index, index + 1
            # A trip made before is its clause, from its subject ("in May my mother went to
            # Italy, I want Greece") up to a contrast or a new clause ("... and I want Athens").
            while went and first > max(0, index - WENT_SUBJECT_MAX_WORDS) and not _is_break(tokens, first - 1) and not (
                    ends_the_part(first - 1, False) or tokens[first - 1].folded in CLAUSE_OPENERS):
                first -= 1
            while end < len(tokens) and not _is_break(tokens, end) and end not in decided and not (
                    went and (ends_the_part(end, False) or tokens[end].folded in CLAUSE_OPENERS)):
                end += 1
            context.update(range(first, end))
    return context


def _names_a_place_after(tokens: Sequence[Token], index: int) -> bool:
    """Is a place named right after the word at ``index``: a word that leads to one, or a
    name, within two words ("foi para a Itália", "visited Lisbon"; not "foi o que decidimos")?"""
    return any(token.folded in PLACE_LEADS or token.capitalised for token in tokens[index + 1:index + 3])


def _clauses_of_the_replaced(tokens: Sequence[Token], conversation: Conversation) -> set:
    """The tokens of the clauses that name a value known so far while the message changes
    something: they tell why the old value goes ("Oktober geht bei der Arbeit nicht", "rome is
    too crowded in summer"), so their values are context. A clause that itself changes or
    rules out ("instead of Rome", "not Paris") is read as usual."""
    context = set()
    for value in conversation.values.values():
        if not isinstance(value, str):
            continue
        for index in find_words(tokens, value):
            first, last = _clause(tokens, index, index + 1)
            if not any(token.folded in CHANGE_WORDS | CONTRASTS for token in tokens[first:last]) and not any(
                    token.folded in NEGATING for token in tokens[first:index]):
                context.update(range(first, last))
    return context


def _tells_of_the_past(tokens: Sequence[Token], span: Span) -> bool:
    """Is the period a time before now: a word of the past in it, and neither a month nor a
    date, nor the past word naming a part of a time ("the last two weeks of June")?"""
    if any(token.folded in MONTHS or token.shape in ("iso", "dmy") for token in tokens[span.start:span.end]):
        return False
    for index in range(span.start, span.end):
        if tokens[index].folded in PAST:
            after = index + 1
            while after < len(tokens) and (tokens[after].shape == "number" or tokens[after].folded in COUNT_WORDS):
                after += 1
            part_of = (after + 1 < span.end and tokens[after].folded in TIME_UNITS
                       and tokens[after + 1].folded in TIME_LINKS)   # the period goes on: "of summer"
            if not part_of:
                return True
    return False


def _by_sentence(tokens: Sequence[Token], spans: Sequence[Span]) -> List[List[Span]]:
    """The spans, grouped by the sentence they stand in."""
    groups: Dict[int, List[Span]] = {}
    for span in spans:
        groups.setdefault(_sentence_of(tokens, span.start), []).append(span)
    return list(groups.values())


def _names_a_time(tokens: Sequence[Token], span: Span) -> bool:
    """Does the period name its time: a month, a day, a season, a holiday, a date?"""
    return any(token.folded in TIME_NAMES or token.shape in ("iso", "dmy")
               or position in getattr(tokens, "in_time_phrases", ()) for position, token in
               enumerate(tokens[span.start:span.end], span.start))


def _counts_a_time(tokens: Sequence[Token], span: Span) -> bool:
    """Is the period a length ("two weeks", "10 días"), not a time relative to now ("last year")?"""
    return any(token.shape == "number" or (token.folded in COUNT_WORDS and token.folded not in ARTICLES)
               for token in tokens[span.start:span.end])


def _read_choice(workflow: Workflow, tokens: Sequence[Token], query: QueryInput, reading: Reading,
                 changing: bool = False, context: AbstractSet[int] = frozenset()) -> None:
    """Choices and their synonyms named anywhere, unless ruled out ("not relaxed") or also a
    choice of another input. With ``changing`` (a choice made before), a synonym changes it
    only when the message asks for a change ("make it busy"), names the input ("a busy
    pace") or is the whole message: "the full plan" is no change of pace."""
    where = (tokens if isinstance(tokens, Tokens) else Tokens(tokens)).where
    for phrase, choice, keys in _choice_phrases(workflow, query):
        if not (keys[0] in where or keys[1] in where):   # not in the message: find_words would find nothing
            continue
        for index in find_words(tokens, phrase):
            if index in context or (changing and phrase not in query.choices
                                    and not _choice_change_asked(tokens, query, index, phrase)):
                continue   # "me dijeron que es más tranquilo" is what others said
            if is_negated(tokens, index) or (index > 0 and tokens[index - 1].folded in EXCESS):
                reading.ruled_out.setdefault(query.name, []).append(choice)
            else:
                reading.add(query.name, 1, choice)


def _choice_phrases(workflow: Workflow, query: QueryInput) -> List[Tuple[str, Any, Tuple[str, str]]]:
    """(phrase, choice, its _index_keys) for the input's choices and synonyms, without those
    that are also a choice of another input or hold no word; worked out once per workflow."""
    known = workflow.derived.setdefault("choice_phrases", {})
    if query.name not in known:
        others = {_fold(word) for other in workflow.query_inputs.values() if other is not query
                  for word in list(other.choices) + [synonym for synonym, _ in other.synonyms]}
        known[query.name] = [(phrase, choice, keys) for phrase, choice in
                             [(choice, choice) for choice in query.choices] + list(query.synonyms)
                             if _fold(phrase) not in others for keys in [_index_keys(phrase)] if keys]
    return known[query.name]


def _choice_change_asked(tokens: Sequence[Token], query: QueryInput, index: int, phrase: str) -> bool:
    """Is the choice word at ``index`` asked for as a change: after a word of change ("make it
    busy"), beside the input's own words ("a busy pace"), or the whole message ("busy")?"""
    size = len(re.findall(r"[^\W_]+", phrase))
    near = tokens[max(0, index - 3):index] + tokens[index + size:index + size + 2]
    words = [token for token in tokens if token.shape != "mark"]
    return (any(token.folded in CHANGES for token in tokens[max(0, index - 3):index])
            or any(token.folded in _topic_words(query) for token in near) or len(words) == size)


def _rate_end(tokens: Sequence[Token], end: int) -> int:
    """Where "a night" ends after an amount that ends at ``end`` ("50 euros a night", "30 € par
    personne"): the amount is a rate, not a total. 0 when no rate follows."""
    if end + 1 < len(tokens) and tokens[end].folded in RATE_WORDS and tokens[end + 1].folded in RATE_UNITS:
        return end + 2
    return 0


def _after_the_last_contrast(tokens: Sequence[Token], spans: List[Span]) -> List[Span]:
    """Of names said on both sides of a contrast, the later ones: "my friend went to Paris,
    but I want to go to Athens" is Athens. Names side by side ("Sydney or Melbourne") stay."""
    for k in range(len(spans) - 1, 0, -1):
        if any(token.folded in CONTRASTS and not _is_except(tokens, position)
               for position, token in enumerate(tokens) if spans[k - 1].end <= position < spans[k].start):
            return spans[k:]
    return spans


def _read_polarity(tokens: Sequence[Token], query: QueryInput, reading: Reading,
                   context: AbstractSet[int] = frozenset()) -> None:
    """A yes/no input from the words that name it: "with the kids" is yes, "no children",
    "sans enfants" and "ohne Kinder" are no; a question ("children allowed?") is neither, nor
    a word in ``context`` ("mia figlia è stata in Thailandia")."""
    seen = set()
    phrases = query.derived.get("polarity_phrases")
    if phrases is None:   # worked out once per input
        phrases = query.derived["polarity_phrases"] = [
            (phrase, meaning, len(re.findall(r"[^\W_]+", str(phrase))), keys)
            for phrase, meaning in [(word, True) for word in _topic_words(query)] + list(query.synonyms)
            for keys in [_index_keys(phrase)] if keys]
    where = (tokens if isinstance(tokens, Tokens) else Tokens(tokens)).where
    for phrase, meaning, size, keys in phrases:
        if not (keys[0] in where or keys[1] in where):   # not in the message: find_words would find nothing
            continue
        for index in find_words(tokens, phrase):
            if index in context:
                continue
            answer = _yes_or_no_after(tokens, index + size)   # "kids: no", "Kinder - nein"
            if answer is not None:
                seen.add(meaning == answer)
            elif not _clause_is_question(tokens, index):
                seen.add(meaning != is_negated(tokens, index))
    if len(seen) == 1:
        reading.polarity[query.name] = seen.pop()
        reading.add(query.name, 1, reading.polarity[query.name])


def _yes_or_no_after(tokens: Sequence[Token], index: int) -> Optional[bool]:
    """A yes or no given right after a topic and a colon or dash: "kids: no"."""
    if index + 1 < len(tokens) and tokens[index].text in ":=-–" and tokens[index + 1].shape == "word":
        word = tokens[index + 1].folded
        return True if word in BOOLEAN_WORDS[True] else False if word in BOOLEAN_WORDS[False] else None
    return None


def _read_bounded_number(workflow: Workflow, conversation: Conversation, tokens: Sequence[Token],
                         taken_tokens: set, reading: Reading) -> None:
    """A number input with both bounds takes the message's one number left over, when it fits
    only that input ("Kalender für 2026, Monat 5": 5 is the month once 2026 is the year)."""
    used = {number for found in reading.candidates.values() for raws in found.values() for raw in raws
            if not isinstance(raw, bool) for number in numbers_in(str(raw))}
    numbers = [_number_or_none(token.folded) for index, token in enumerate(tokens)
               if token.shape == "number" and index not in taken_tokens]
    left = [number for number in numbers if number is not None and number not in used]
    bounded = [query for query in workflow.query_inputs.values()
               if query.type in NUMERIC_TYPES and query.name not in conversation.values
               and query.name not in reading.candidates and query.minimum is not None and query.maximum is not None]
    if len(left) != 1:
        return
    fits = [query for query in bounded if query.minimum <= left[0] <= query.maximum]
    if len(fits) == 1:
        reading.add(fits[0].name, 1, left[0])


def _choose(workflow: Workflow, reading: Reading, extraction: Extraction) -> None:
    """Per input, the strongest candidates: one value is accepted, several are asked about."""
    for name, found in reading.candidates.items():
        query = workflow.query_inputs[name]
        if len(found) == 1:   # the common case: candidates of one strength, found without a call of max()
            (strongest,) = found.values()
        else:
            strongest = found[max(found)]
        if len(strongest) == 1 and not reading.ruled_out.get(name):   # the common case: one value, nothing ruled out
            try:
                extraction.values[name] = coerce_value(query, strongest[0])
            except ValueError as exc:
                extraction.rejected[name] = str(exc)
            continue
        values, problems = [], []
        ruled_out = [_coerce_or_none(query, raw) for raw in reading.ruled_out.get(name, [])]
        for raw in strongest:
            try:
                value = coerce_value(query, raw)
            except ValueError as exc:
                problems.append(str(exc))
                continue
            if value not in values and value not in ruled_out:
                values.append(value)
        if len(values) == 1:
            extraction.values[name] = values[0]
        elif len(values) > 1:
            extraction.ambiguous[name] = values
        elif problems:
            extraction.rejected[name] = problems[0]


def _coerce_or_none(query: QueryInput, raw: Any) -> Any:
    try:
        return coerce_value(query, raw)
    except ValueError:
        return None


OFFERED_AMONG_OTHERS = "your message offers it as one of several"


def ground(query: QueryInput, value: Any, raw: Any, text: str, tokens: Sequence[Token], reading: Reading,
           asked: bool = False) -> Optional[str]:
    """Why the message does not support a value the LLM proposed, or None when it does: the
    message must say it, not rule it out, not offer it as one of several, and it must be of
    the input's kind (a period for dates, not a date for a place)."""
    if not is_stated_in(query, value, raw, text, asked):
        return "your message does not say it"
    if any(_coerce_or_none(query, out) == value for out in reading.ruled_out.get(query.name, [])):
        return "your message rules it out"   # as the reader alone found it: "not Paris", "zu voll"
    if query.type == "boolean":
        stated = reading.polarity.get(query.name)
        return None if stated is None or stated == value else f"your message says {shown_value(stated)}"
    phrase = raw if query.type == "choice" and find_words(tokens, raw) else value
    if isinstance(value, (int, float)) and query.type in NUMERIC_TYPES and not query.synonyms:
        return None
    places = find_words(tokens, phrase)
    size = len(re.findall(r"[^\W_]+", str(phrase)))
    if places and all(is_negated(tokens, index) for index in places):
        return "your message rules it out"
    if places and all(alternatives_to(tokens, index, size) for index in places):
        return OFFERED_AMONG_OTHERS
    kind = input_kind(query)
    value_tokens = tokenize(str(value))
    if kind == "date" and not asked and not any(token.shape != "word" and token.shape != "mark" or _is_time_word(token)
                                                for token in value_tokens):
        return "that is not a date or a period"
    if kind in ("place", "text") and value_tokens and (
            all(_time_role(value_tokens, i) for i in range(len(value_tokens)))
            or (kind == "place" and period_spans(value_tokens)) or money_spans(str(value), value_tokens)):
        # "Oporto del 1 al 4 de junio" for a destination (a small model's reading): a place holds no dates
        return f"that is not a {'place' if kind == 'place' else 'value'} for the {query.label}"
    return None


def is_stated_in(query: QueryInput, value: Any, raw: Any, text: str, asked: bool = False) -> bool:
    """Does the user's message say this value at all? Nothing the user did not say is accepted.
    ``asked``: the last question asked for this input, so a bare "yes" answers it."""
    message_words = set(_words(text))
    if query.type in NUMERIC_TYPES:
        # A synonym counts as written in the workflow ("May", not "I may"), or any way when it
        # answers the question that asked for this input.
        spelled = set(re.findall(r"\w+", str(text)))
        return (any(abs(number - float(value)) < 1e-9 for number in numbers_in(text, spaced=True))
                or any(float(number) == float(value) and (set(re.findall(r"\w+", word)) <= spelled
                                                          or asked and set(_words(word)) <= message_words)
                       for word, number in query.synonyms)
                or any(float(number) == float(value) and word in message_words
                       for word, number in synonyms_read(query)[len(query.synonyms):]))
    if query.type == "boolean":   # the message names what the input is about, or answers its question
        yes_no = YES_OR_NO
        named = {words[0] for synonym, _ in query.synonyms for words in [_words(synonym)] if len(words) == 1}
        # a phrase ("só adultos") counts whole, in _synonyms_named: its "so" alone says nothing
        return (bool(message_words & (_topic_words(query) | named)) or bool(_synonyms_named(query, text))
                or (asked and bool(message_words & yes_no)))
    candidates = [str(value)]
    if query.type == "choice":
        candidates += [str(raw)] + [synonym for synonym, choice in query.synonyms if choice == value]
    words = _words(text)
    return any(_words(candidate) and _says_words(words, _words(candidate)) or
               (_words(candidate) and set(_words(candidate)) <= message_words) for candidate in candidates)


def extract_offline(workflow: Workflow, conversation: Conversation, text: str,
                    history: Sequence[dict] = ()) -> Extraction:
    """The deterministic reader alone (no LLM, or the LLM failed)."""
    return read_floor(workflow, conversation, text, history)[0]


def _direct_reply(workflow: Workflow, conversation: Conversation, text: str, tokens: Tokens) -> Dict[str, Any]:
    """The answer to the question just asked, unless the message looks like something else:
    a question back, or talk of another input ("my budget is 2000" when asked where to go),
    or a long sentence given to a text input (its typed spans are read instead: "I'd like to
    go to Lisbon, please"). When the question asked for several inputs (an LLM phrased it),
    a bare answer goes to the one of them it can only be: "Tokyo", "5000", "cherry blossom
    season"."""
    asked = [workflow.query_inputs[name] for name in conversation.asked if name in workflow.query_inputs]
    fitting = asked if len(asked) == 1 else [query for query in asked if _fits(query, text, tokens)]
    if len(fitting) != 1:
        return {}
    query = fitting[0]
    others = [other for other in workflow.query_inputs.values()
              if other.name != query.name and other.name not in conversation.values]
    chosen = [other for other in workflow.query_inputs.values() if other.name != query.name
              and other.type == "choice" and any(_words(choice) == _words(text) for choice in other.choices)]
    if len(chosen) == 1:   # "celsius", asked which city: the unit, whatever was asked
        return {chosen[0].name: _reply_value(chosen[0], text)}
    if not _fits(query, text, tokens):   # a bare value of another kind: "2000" when asked where to go
        instead = [other for other in others if not other.optional and _fits(other, text, tokens)]
        if len(instead) == 1 and input_kind(instead[0]) not in ("place", "text") and _is_bare(tokens):
            return {instead[0].name: _reply_value(instead[0], text)}
        # An amount alone, with its currency, changes the one amount known: "3000 euros"
        # when asked for the dates, after a budget of 2000.
        amounts = [other for other in workflow.query_inputs.values() if other.name in conversation.values
                   and other.name != query.name and input_kind(other) == "money" and _fits(other, text, tokens)]
        if not instead and len(amounts) == 1 and _is_bare(tokens) and money_spans(text, tokens):
            return {amounts[0].name: _reply_value(amounts[0], text)}
        if query.type not in STRING_TYPES:   # "5 days at Christmas" is no budget: its spans are read instead
            return {}
    if text.rstrip().endswith("?") or any(set(_words(text)) & _topic_words(other) - _topic_words(query)
                                          for other in others if other.type != "boolean"):
        return {}
    words = _words(text)
    if query.type in STRING_TYPES:
        if input_kind(query) == "place" and 1 < len(text.split()) <= MAX_DIRECT_REPLY_WORDS:
            names = _names_in(tokens, words_taken(workflow))
            if len(names) == 1:
                return {query.name: names[0]}
        if input_kind(query) != "date" and any(_is_break(tokens, k) for k in range(len(tokens) - 1)):
            return {}   # "Neapel. Entschieden.": a sentence, not a bare value
        if (len(text.split()) > MAX_DIRECT_REPLY_WORDS or (words and words[0] in SENTENCE_STARTS)
                or (re.search(r"\d", text) and any(o.type in NUMERIC_TYPES for o in others))
                or (period_spans(tokens) and input_kind(query) != "date" and any(input_kind(o) == "date" for o in others))
                or not _could_be(query, tokens, words)):
            return {}
    return {query.name: _reply_value(query, text)}


def _is_bare(tokens: Sequence[Token]) -> bool:
    """Is a reply one value alone, not a sentence with several ("4 days in March is fine, but
    the budget is 600")? Its spans are read instead."""
    return not any(_is_break(tokens, k) or tokens[k].folded in CONTRASTS for k in range(len(tokens) - 1))


def _fits(query: QueryInput, text: str, tokens: Sequence[Token]) -> bool:
    """Could a bare reply be this input's value, and that of no input of another kind?"""
    words = _words(text)
    timely = any(_is_time_word(token) for token in tokens)
    if query.type in NUMERIC_TYPES:
        return len(numbers_in(text)) == 1 and not timely or len(_synonyms_named(query, text)) == 1
    if query.type == "choice":
        return len(_choices_named(query, text)) == 1
    if query.type == "boolean":
        return bool(set(words) & (YES_OR_NO))
    if input_kind(query) == "date":
        return is_period(tokens)
    return (0 < len(words) <= MAX_DIRECT_REPLY_WORDS and not timely and not re.search(r"\d", text)
            and _could_be(query, tokens, words))


def _could_be(query: QueryInput, tokens: Sequence[Token], words: Sequence[str]) -> bool:
    """Could a short reply be a value of this kind? A date has a word of time or a number; a
    place or a text is not made of words that only talk ("Add Details", "Tell me more",
    "hmm, let me think": Open WebUI sends its regenerate buttons as messages)."""
    if input_kind(query) == "date":
        return is_period(tokens)
    if input_kind(query) == "place" and not any(word not in ALL_WORDS for word in words) and not any(
            token.capitalised for token in tokens):   # "de 10/06 a 15/06" names no place: "Como" does
        return False
    return not words or not all(word in NON_ANSWERS for word in words)


def is_period(tokens: Sequence[Token]) -> bool:
    """Does a short reply name a time: a period in words, a date, a day ("the 10th"), two
    days joined ("10-17"), or a month's name alone, even one that is another word too
    ("March", "May")? A bare "42" or "around $3000" does not."""
    numbers = [token for token in tokens if token.shape == "number" and (_number_or_none(token.folded) or 0) <= 31]
    words = [token for token in tokens if token.shape != "mark"]
    if len(words) == 1 and words[0].folded in MONTHS:
        return True
    return bool(period_spans(tokens)) or any(token.shape in ("iso", "dmy", "ordinal") for token in tokens) or (
        len(numbers) == 2 and len(tokens) <= 5 and not money_spans(getattr(tokens, "text", ""), tokens))


def field_value(query: QueryInput, raw: Any) -> Any:
    """A value given in a field of its own (an MCP argument, a form's answer), held to what
    chat holds a direct answer to (is_period, _could_be), then coerced as chat coerces it: a date
    needs a period or a date ("42" is neither), a place or a text needs words (not a number, a
    yes/no or "tell me more"). A month's name alone is a date here: in chat, "May" may be the
    verb; in a field for dates it is not. ValueError says why not, in words for the user."""
    if isinstance(raw, (dict, list)):   # the schema says one value: [1] is no budget (an LLM's list is unwrapped elsewhere)
        raise ValueError(f"I need one value for the {query.label}, not {as_written(raw)}")
    if query.type not in STRING_TYPES or raw is None:
        return coerce_value(query, raw)   # numbers, yes/no and choices are typed there; no text is "some text"
    kind = input_kind(query)
    if isinstance(raw, (bool, int, float)):
        wanted = {"date": "a period or a date", "place": "a place"}.get(kind, "some text")
        raise ValueError(f"I need {wanted} for the {query.label}, not {as_written(raw)}")
    text = valid_text(str(raw))
    tokens = tokenize(text)
    if kind == "date" and not (is_period(tokens) or any(token.folded in MONTHS for token in tokens)):
        raise ValueError(f"I need a period or a date for the {query.label}, not {as_written(text.strip())}")
    if kind != "date" and text.strip() and not _could_be(query, tokens, _words(text)):
        raise ValueError(f"I need {'a place' if kind == 'place' else 'the ' + query.label + ' itself'} for the "
                         f"{query.label}, not {as_written(text.strip())}")
    return coerce_value(query, text)


LABEL_SEPARATORS_PATTERN = re.compile(r"[\s\-]+")   # "travel dates", "travel-dates": travel_dates


def _input_named(workflow: Workflow, key: str) -> Optional[str]:
    """The input a label names: its name ("travel_dates", "travel dates"), its label in
    another language, or words of its label that name no other input ("dates")."""
    own_names = _inputs_named_by_own_name(workflow)
    if key in own_names:   # the commonest label: an input's name as it is ("budget")
        return own_names[key]
    return _input_named_by(workflow, key)


def _inputs_named_by_own_name(workflow: Workflow) -> Dict[str, Optional[str]]:
    """What _input_named finds for each input's own name, worked out once per workflow."""
    found = workflow.derived.get("inputs_named_by_own_name")
    if found is None:
        found = workflow.derived["inputs_named_by_own_name"] = {
            name: _input_named_by(workflow, name) for name in workflow.query_inputs}
    return found


def _input_named_by(workflow: Workflow, key: str) -> Optional[str]:
    wanted = LABEL_SEPARATORS_PATTERN.sub("_", _fold(key).strip())
    named_so = _inputs_by_folded_name(workflow).get(wanted)
    if named_so is not None:
        return named_so
    translated = _inputs_by_translated_label(workflow).get(tuple(_words(key)))   # "dates du voyage"
    if translated is not None:
        return translated
    words = set(_words(key))
    # A word of the input's kind, in any language: "where", "when", "Ziel", "fechas", "presupuesto".
    named = [name for name, query in workflow.query_inputs.items()
             if words and input_kind(query) in KINDS and words <= KINDS[input_kind(query)]]
    if len(named) == 1:
        return named[0]
    if not words or any(len(word) < 3 or word in COMMON_WORDS for word in words):
        return None
    named = [name for name, query in workflow.query_inputs.items() if words <= set(_words(query.label))]
    return named[0] if len(named) == 1 else None


def _inputs_by_folded_name(workflow: Workflow) -> Dict[str, str]:
    """The workflow's inputs by their names folded (the first of two that fold the same), once per workflow."""
    found = workflow.derived.get("inputs_by_folded_name")
    if found is None:
        found = {}
        for name in workflow.query_inputs:
            found.setdefault(_fold(name), name)
        workflow.derived["inputs_by_folded_name"] = found   # whole: another thread may look at once
    return found


def _inputs_by_translated_label(workflow: Workflow) -> Dict[Tuple[str, ...], str]:
    """The workflow's inputs by the words of their labels in other languages, once per workflow."""
    found = workflow.derived.get("inputs_by_translated_label")
    if found is None:
        found = workflow.derived["inputs_by_translated_label"] = {
            tuple(_words(text.label)): name for name, query in workflow.query_inputs.items()
            for text in query.translations.values() if text.label}
    return found


def _labelled_phrase(query: QueryInput, text: str, kind_labels: Sequence[str] = ()) -> Optional[str]:
    """A short phrase right after a text input's label, up to punctuation: "destination
    Paris, budget 2000" gives Paris. Not a phrase that opens like a sentence ("destination
    with beaches"). A word of the input's kind in another language labels it too, but only
    with a copula or a colon before a capitalised name ("Ziel ist Bangkok"): alone, such a
    word is too common ("the city was lovely")."""
    found = _phrase_after(r"[\s_-]+".join(map(re.escape, _words(query.label))), text)
    if found or not kind_labels:
        return found and found[1]
    found = _phrase_after(folded_pattern(kind_labels), text)
    return found[1] if found and found[0] and found[1][0].isupper() else None


def _phrase_after(label: str, text: str) -> Optional[Tuple[str, str]]:
    """The link ("is", ":") and the phrase after a label's first place in the text."""
    # The phrase ends at punctuation, but not at the dot of an abbreviation ("St. Louis").
    match = re.search(r"(?i:\b(?:" + label + r")\b)\s*((?i:" + COPULA_PATTERN + r")\b|:|=)?\s*((?:" + ABBREVIATION_PATTERN
                      + r"|[^\n,;.!?()])+)", text)
    if not match:
        return None
    phrase = match.group(2).strip()
    words = _words(phrase)
    if not words or len(words) > MAX_DIRECT_REPLY_WORDS or words[0] in SENTENCE_STARTS | PHRASE_STARTS:
        return None
    if not match.group(1) and not phrase[0].isupper():   # "destination Paris", not "destination really"
        return None
    return match.group(1) or "", phrase


def _reply_value(query: QueryInput, text: str) -> Any:
    """What a direct answer to "what is the <input>?" holds."""
    if query.type in NUMERIC_TYPES:
        found = numbers_in(text)
        named = _synonyms_named(query, text)
        return found[0] if len(found) == 1 and not named else text   # "May 3": the coercion decides
    if query.type == "boolean":
        words = [word for word in _words(text) if word in YES_OR_NO]
        return words[0] if len(set(words)) == 1 else text
    if query.type == "choice":
        named = _choices_named(query, text)
        return named[0] if len(named) == 1 else text
    text = text.strip().rstrip(".!")
    tokens = tokenize(text)
    start = 0   # "Actually, rather in May" is May, as "in May" is in a sentence (decision in the README)
    while start < len(tokens) - 1 and (tokens[start].folded in CHANGE_WORDS or tokens[start].shape == "mark" or (
            input_kind(query) == "date" and tokens[start].folded in LEADING_LINKS and _leads_into_period(tokens, start))):
        start += 1
    return text[tokens[start].start:] if tokens else text


def _choices_named(query: QueryInput, text: str) -> List[str]:
    words = " " + " ".join(_words(text)) + " "
    return [choice for choice in query.choices if " " + " ".join(_words(choice)) + " " in words]


def extraction_schema(workflow: Workflow, single_call: bool = False) -> dict:
    value_types = ["string", "number", "boolean", "null"]
    schema = {
        "type": "object",
        "properties": {
            "values": {"type": "object",
                       "properties": {name: {"type": value_types} for name in workflow.query_inputs},
                       "required": list(workflow.query_inputs), "additionalProperties": False},
            "intent": {"type": "string", "enum": list(INTENTS)},
        },
        "required": ["values", "intent"],
        "additionalProperties": False,
    }
    if single_call:
        schema["properties"]["question"] = {"type": ["string", "null"]}
        schema["required"].append("question")
    return schema


def extraction_messages(workflow: Workflow, conversation: Conversation, history: Sequence[dict],
                        text: str, single_call: bool = False) -> List[dict]:
    """The extraction call: everything about the workflow in the system message, earlier
    turns quoted as context, and the new message alone as the user message."""
    inputs = []
    for query in workflow.query_inputs.values():
        shown_type = f"one of {', '.join(query.choices)}" if query.type == "choice" else query.type
        line = f"- {query.name} ({shown_type}{', optional' if query.optional else ''}): {query.description}"
        uses = [f"{node.id} ({node.description})" if node.description else node.id
                for node in workflow.nodes_fed_by(query.name)]
        line += f" Used by: {'; '.join(uses)}."
        if query.name in conversation.values:
            line += f" Known so far: {conversation.values[query.name]!r}."
        inputs.append(line)
    context = ""
    if history:
        turns = "\n".join(f"{message['role']}: {within_reading_limit(str(message['content']))}"
                          for message in history[-CONTEXT_TURNS:])
        context = f"\nEarlier turns (context only):\n{turns}\n"
    keys = ", ".join(f'"{name}": null' for name in workflow.query_inputs)
    prompt = EXTRACTION_PROMPT.format(name=workflow.name, description=workflow.description,
                                      inputs="\n".join(inputs), context=context, keys=keys,
                                      question_key=', "question": null' if single_call else "",
                                      single_call_rule=SINGLE_CALL_RULE if single_call else "")
    return [{"role": "system", "content": prompt}, {"role": "user", "content": text}]


def extract_with_llm(llm: LLMClient, workflow: Workflow, conversation: Conversation,
                     history: Sequence[dict], text: str, floor: Extraction, reading: Reading,
                     asks: bool = True) -> Extraction:
    """The LLM's reading, grounded against the message and merged on top of the floor; with
    ``asks`` and an upstream that writes it there, the question for what is left open too."""
    single_call = asks and llm.asks_in_extraction
    answer = llm.complete_json(extraction_messages(workflow, conversation, history, text, single_call),
                               extraction_schema(workflow, single_call), max_tokens=EXTRACTION_MAX_TOKENS)
    proposed = answer.get("values", answer)
    if not isinstance(proposed, dict):
        raise UpstreamError("the language model's answer had no 'values' object")
    intent = answer.get("intent") if answer.get("intent") in INTENTS else "provide"
    if floor.intent == "cancel" or (intent == "cancel" and set(_words(text)) & CANCELS):
        return Extraction(intent="cancel")
    extraction = Extraction(values=dict(floor.values), rejected=dict(floor.rejected),
                            ambiguous=dict(floor.ambiguous), intent="provide" if intent == "cancel" else intent)
    _merge(workflow, proposed, text, reading, extraction, conversation.asked)
    question = answer.get("question")
    if single_call and isinstance(question, str) and question.strip():
        extraction.question = question.strip()
        extraction.question_assumes = frozenset(name for name, raw in proposed.items()
                                                if raw is not None and not (isinstance(raw, str) and not raw.strip()))
    return extraction


def _merge(workflow: Workflow, proposed: Mapping[str, Any], text: str, reading: Reading, extraction: Extraction,
           asked: Sequence[str]) -> None:
    """Each value the LLM proposes is coerced and grounded; where the floor read the same
    input differently, the floor's reading wins unless the LLM's holds it whole (a fuller
    reading of the same words: "a week in mid-October" over "mid-October")."""
    tokens = reading.tokens
    for name, raw in proposed.items():
        query = workflow.query_inputs.get(name)
        if query is None or raw is None or (isinstance(raw, str) and not raw.strip()):
            continue
        try:
            value = coerce_value(query, raw)
        except ValueError as exc:
            if name not in extraction.values:
                extraction.rejected.setdefault(name, str(exc))
            continue
        why = ground(query, value, raw, text, tokens, reading, asked=name in asked)
        if why == OFFERED_AMONG_OTHERS and name not in extraction.values:
            phrase = raw if query.type == "choice" and find_words(tokens, raw) else value
            places = find_words(tokens, phrase)
            others = alternatives_to(tokens, places[0], len(re.findall(r"[^\W_]+", str(phrase)))) if places else []
            extraction.ambiguous.setdefault(name, [value] + [o for o in others if o != value])
        if why:
            extraction.ignored[name] = (raw, why)
            continue
        value = as_the_user_wrote(query, value, tokens)
        floor_value = extraction.values.get(name)
        if floor_value is None or floor_value == value:
            extraction.values[name] = value
            extraction.ambiguous.pop(name, None)
            extraction.rejected.pop(name, None)
        elif isinstance(value, str) and _says_words(_words(value), _words(str(floor_value))):
            extraction.notes.append(f"Took the language model's reading of the {query.label}, "
                                    f"{shown_value(value)!r}, which holds {shown_value(floor_value)!r}.")
            extraction.values[name] = value
        else:
            extraction.notes.append(f"Kept the {query.label} {shown_value(floor_value)!r} as your message "
                                    f"states it; the language model read {shown_value(value)!r}.")


def as_the_user_wrote(query: QueryInput, value: Any, tokens: Tokens) -> Any:
    """A text value as the message spells it: the LLM's "paris" is the user's "Paris", its
    "a week in mid-october" the user's "a week in mid-October". Other values are as read."""
    if query.type not in STRING_TYPES or not isinstance(value, str):
        return value
    size = len([token for token in tokenize(value) if token.shape != "mark"])
    places = find_words(tokens, value)
    if not places or not size:
        return value
    words = [position for position, _ in tokens.words]
    first = words.index(places[0])
    if first + size > len(words):
        return value
    return _span_text(tokens, places[0], words[first + size - 1] + 1)


def extract(llm: Optional[LLMClient], workflow: Workflow, conversation: Conversation,
            history: Sequence[dict], text: str, asks: bool = True) -> Extraction:
    """Read the new message: the deterministic floor always, and the LLM on top when there
    is one (a failing LLM leaves the floor's reading, with a note). ``asks``: a question for
    what is left open may be written in the same call (not for MCP, which asks by a form)."""
    floor, reading = read_floor(workflow, conversation, text, history)
    return floor if llm is None else extract_on_floor(llm, workflow, conversation, history, reading.tokens.text,
                                                      floor, reading, asks)


def extract_on_floor(llm: LLMClient, workflow: Workflow, conversation: Conversation, history: Sequence[dict],
                     text: str, floor: Extraction, reading: Reading, asks: bool = True) -> Extraction:
    """extract's second step: the LLM's reading on top of the floor's (``text`` cleaned by
    user_words); a failing LLM leaves the floor's reading, with a note."""
    try:
        return extract_with_llm(llm, workflow, conversation, history, text, floor, reading, asks)
    except UpstreamError as exc:
        floor.llm_failed = True
        floor.notes.append(f"Reading your message with the language model failed ({exc.message}); "
                           "used the simple reader instead.")
        return floor


####################################################################################
# Questions: asking for what is missing
####################################################################################

QUESTION_PROMPT = """\
You are the friendly assistant of the workflow "{name}": {description}

{understood}Still needed from the user:
{missing}
{problems}
Write one short, natural question that asks the user for what is still needed. Acknowledge \
what was understood, if anything. Reply in the language of the user's last message. Do not \
answer for the user, do not invent values, do not use lists or forms, and ask nothing else."""


# What the LLM writes for the user outside a workflow's own `llm` node (questions, a chat's title,
# suggestions) is checked before it is shown; failing, the templated text is shown instead.
CHECKED_TEXT_MAX_CHARS = 400              # a question a person can act on: a sentence or two
TITLE_MAX_CHARS = 80                      # a chat's title (Open WebUI's task)
SUGGESTION_MAX_CHARS = 80                 # one follow-up suggestion
# Chat-template markers and the debris of a small model that talks to itself: a role label
# opening a line, a quoted block, special tokens of every common template.
CHAT_TEMPLATE_PATTERN = re.compile(
    r"\[/?INST\]|<</?SYS>>|</?start_of_turn>|<end_of_turn>|<\|[^|<>\s]{1,40}\|>|</?s>|<bos>|<eos>|```"
    r"|^[ \t]*>|^[ \t]*\**(?:assistant|user|system|model|human|bot|ai|question|answer|response)\**[ \t]*:",
    re.I | re.M)
PROMPT_ECHO_WORDS = 6                     # this many words in a row from the server's prompts is an echo
SENTENCE_START_PATTERN = re.compile(r"(?:\A|[.!?¿¡:;\n])[\s\"'«(]*\Z")
CAPITALISED_WORD_PATTERN = re.compile(r"\b[^\W\d_a-z][\w'’-]*")
NUMBER_IN_TEXT_PATTERN = re.compile(r"\d+(?:[.,'’\u00a0\u202f ]\d{3})*(?:[.,]\d+)?")


def language_of(text: str) -> Optional[str]:
    """The language whose common words the text uses most (the tables at the end of "Reading:
    the language tables"), or None when it uses too few of them to tell or two equally."""
    words = _words(text)
    counts = sorted(((sum(word in table for word in words), language) for language, table in LANGUAGE_WORDS.items()),
                    reverse=True)
    (best, language), (second, _) = counts[0], counts[1]
    return language if best >= 2 and best > second else None


_PROMPT_ECHOES: List[frozenset] = []     # made at the first check


def _prompt_echoes() -> frozenset:
    """Every run of PROMPT_ECHO_WORDS words of the server's own prompts, placeholders left out."""
    if not _PROMPT_ECHOES:
        runs = set()
        for prompt in _server_prompts():
            for part in re.split(r"\{[^{}]*\}", prompt):
                words = _words(part)
                runs.update(tuple(words[i:i + PROMPT_ECHO_WORDS]) for i in range(len(words) - PROMPT_ECHO_WORDS + 1))
        _PROMPT_ECHOES.append(frozenset(runs))
    return _PROMPT_ECHOES[0]


def _server_prompts() -> Tuple[str, ...]:
    return (EXTRACTION_PROMPT, SINGLE_CALL_RULE, QUESTION_PROMPT, SUGGESTIONS_PROMPT)


def workflow_words(workflow: Workflow) -> str:
    """What the workflow itself offers: its name, description, and each input's label,
    description, question, choices, synonyms, default and bounds."""
    parts = [workflow.name, workflow.description]
    for query in workflow.query_inputs.values():
        parts += [query.label, query.description, query.question, *query.choices,
                  *(f"{word} {value}" for word, value in query.synonyms)]
        parts += [shown_value(bound) for bound in (query.default, query.minimum, query.maximum) if bound is not None]
    return "\n".join(str(part) for part in parts)


def _number_key(text: str) -> str:
    return re.sub(r"[^\d]", "", text.split(",")[0] if re.fullmatch(r"\d+,\d{1,2}", text) else text).lstrip("0")


def debris_or_echo(text: str) -> Optional[str]:
    """Why a text the LLM wrote is no text for a person, whatever else it holds: chat-template
    debris, or a run of the server's own prompt."""
    debris = CHAT_TEMPLATE_PATTERN.search(text)
    if debris:
        shown = debris.group(0).strip() or "a quoted block"
        return f"it holds chat-template debris ({'a quoted block' if shown == '>' else shown})"
    words = _words(text)
    if any(tuple(words[i:i + PROMPT_ECHO_WORDS]) in _prompt_echoes() for i in range(len(words))):
        return "it repeats the server's own instructions"
    return None


def check_llm_text(text: str, workflow: Workflow, said: Sequence[str], language: Optional[str],
                   asks: bool = True, max_chars: int = CHECKED_TEXT_MAX_CHARS, names: bool = True) -> Optional[str]:
    """Why the LLM's ``text`` cannot be shown to the user, or None when it can: it must be
    short, ask (when ``asks``: end with "?"), hold no chat-template debris nor the server's
    own prompt, be in ``language`` (the user's, when known), and name no number, nor (with
    ``names``; a title is in title case) capitalised name, that neither the user's messages
    (``said``) nor the workflow holds."""
    text = text.strip()
    if not text:
        return "it was empty"
    if len(text) > max_chars:
        return f"it is {len(text)} characters long, over {max_chars}"
    problem = debris_or_echo(text)
    if problem:
        return problem
    if asks and not re.search(r"[?？][\W_]*\Z", text):
        return "it asks nothing: no question mark"
    written_in = language_of(text)
    if language and written_in and written_in != language:
        return f"it is in {written_in}, your message in {language}"
    known_text = "\n".join(list(said) + [workflow_words(workflow)])
    known_numbers = {_number_key(number) for number in NUMBER_IN_TEXT_PATTERN.findall(known_text)}
    for number in NUMBER_IN_TEXT_PATTERN.findall(text):
        if _number_key(number) not in known_numbers:
            return f"it names {number.strip()!r}, which you did not say and the workflow does not offer"
    known_words = set(_words(known_text)) | CURRENCIES
    for match in CAPITALISED_WORD_PATTERN.finditer(text if names else ""):
        if SENTENCE_START_PATTERN.search(text[:match.start()]) or match.group(0) == "I":
            continue
        if not set(_words(match.group(0))) <= known_words:
            return f"it names {match.group(0)!r}, which you did not say and the workflow does not offer"
    return None


def users_language(said: Sequence[str]) -> Optional[str]:
    """The language of the user's newest message, else of all their messages together."""
    return (language_of(said[-1]) if said else None) or language_of("\n".join(said))


SUGGESTIONS_MAX = 5                       # follow-up suggestions offered at once
SUGGESTIONS_PROMPT = """\
Translate each of these short replies, which a user may send to a chat assistant, into {language}. \
Keep their meaning, and keep every name and number as it is. Answer with one JSON object and nothing \
else: {{"follow_ups": [the {count} translated replies, in the same order]}}"""


def follow_ups_offline(workflow: Workflow, conversation: Optional[Conversation]) -> List[str]:
    """Replies that move the conversation on, built from the workflow, as a user would send
    them: while an input is asked for, the ways to answer it (its choices, yes or no, the words
    of its synonyms); at any time, the optional inputs that can still change ("Make the pace
    relaxed", "With kids"); after a run, "Run it again". None names a value the workflow does not offer."""
    values = dict(conversation.values) if conversation is not None else {}
    missing = workflow.missing(values)
    asked = [name for name in (conversation.asked if conversation is not None else []) if name not in values]
    suggestions: List[str] = []
    if missing:
        query = workflow.query_inputs[asked[0]] if asked else missing[0]
        suggestions += _answers_to(query)
    current = workflow.with_defaults(values)
    for query in workflow.query_inputs.values():
        if not query.optional:
            continue
        # Said as the reader reads it: a value given before changes by its label ("pace: packed").
        given = query.name in values
        if query.type == "choice":
            suggestions += [f"{query.label}: {choice}" if given else f"Make the {query.label} {choice}"
                            for choice in query.choices if choice != current.get(query.name)]
        elif query.type == "boolean":
            word = next((str(said) for said, meant in query.synonyms if meant is True), "")
            wanted = not current.get(query.name, False)
            suggestions.append(f"{'With' if wanted else 'Without'} {word}" if word and not given else
                               f"{query.label}: {shown_value(wanted)}")
    if not missing and conversation is not None and conversation.runs:
        suggestions.append("Run it again")
    return list(dict.fromkeys(suggestions))[:SUGGESTIONS_MAX]


def _answers_to(query: QueryInput) -> List[str]:
    if query.type == "choice":
        return [choice[:1].upper() + choice[1:] for choice in query.choices]
    if query.type == "boolean":
        return ["Yes", "No"]
    first_words = {}   # the first word for each value: the month calendar's "January", "February", "March"
    for word, meant in query.synonyms:
        first_words.setdefault(str(meant), str(word))
    return list(first_words.values())[:3]


def follow_ups_with_llm(llm: LLMClient, workflow: Workflow, offline: Sequence[str], language: str) -> List[str]:
    """The offline suggestions in the user's language; each checked like every text the LLM
    writes for the user (UpstreamError when any fails: the offline ones are shown then)."""
    prompt = SUGGESTIONS_PROMPT.format(language=language, count=len(offline))
    listed = json.dumps(list(offline), ensure_ascii=False)
    answer = first_json_object(llm.complete([{"role": "system", "content": prompt}, {"role": "user", "content": listed}],
                                            max_tokens=CLIENT_TASK_MAX_TOKENS))
    translated = answer.get("follow_ups")
    if not isinstance(translated, list) or len(translated) != len(offline):
        raise UpstreamError(f"the language model's follow-ups were not a list of {len(offline)} texts")
    for text in translated:
        why = check_llm_text(str(text), workflow, list(offline), language, asks=False, max_chars=SUGGESTION_MAX_CHARS)
        if not isinstance(text, str) or why:
            raise UpstreamError(f"the language model's follow-up {str(text)[:40]!r} cannot be shown: {why}")
    return [text.strip() for text in translated]


def elicitation_message(workflow: Workflow, missing: Sequence[QueryInput], problems: Mapping[str, str]) -> str:
    """The message of a form asking for every input in ``missing`` (MCP): it names each one,
    and asks each one's question."""
    if len(missing) == 1:
        return question_offline(workflow, missing, {}, {}, problems, line_hint=False)
    parts = [reason[0].upper() + reason[1:] + "." for reason in problems.values()]
    parts.append(f"I still need the {_and_list([query.label for query in missing])}.")
    parts += [query.question or f"What is the {query.label} ({query.description.rstrip('.')})?" for query in missing]
    return " ".join(parts)


def reply_language(workflow: Workflow, named: Iterable[str], asked: QueryInput, said: Sequence[str],
                   problems: Mapping[str, str], shown: Iterable[Tuple[str, Any]] = ()) -> Language:
    """The language a templated reply is written in: the user's (``said``: their messages),
    when its table writes sentences and the workflow gives, in that language, the question
    ``asked``, the label of every input ``named`` and the name of every choice ``shown``
    ((input, value) pairs); else English, whole. A reply that says why a value was refused
    is English too: the reasons are written in English only."""
    name = (users_language(said) or _language_by_its_words("\n".join(said[-1:]))
            or _language_by_its_words("\n".join(said)))
    language = next((language for language in LANGUAGES.values() if language.name == name), ENGLISH)
    if language is ENGLISH or not language.writes or problems or not asked.question_in(language.code):
        return ENGLISH
    code, inputs = language.code, workflow.query_inputs
    if not all(inputs[input_name].label_in(code) for input_name in named) or not all(
            inputs[input_name].choice_in(code, value) for input_name, value in shown
            if inputs[input_name].type == "choice"):
        return ENGLISH
    return language


# Per language, the words of its table that no other table holds ("vorrei", "settimane", "maggio").
OWN_WORDS: Mapping[str, frozenset] = MappingProxyType({
    language.name: frozenset(word for _, word in _language_entries(language)) - frozenset(
        word for other in LANGUAGES.values() if other is not language for _, word in _language_entries(other))
    for language in LANGUAGES.values()})


def _language_by_its_words(text: str) -> Optional[str]:
    """For a message too short to tell by its common words ("Vorrei andare a Roma. Due
    settimane a maggio", "que tempo faz?"): the language whose own words, and then common
    words, it holds most, if one does."""
    words = _words(text)
    counts = sorted(((sum(2 * (word in own) + (word in LANGUAGE_WORDS[name]) for word in words), name)
                     for name, own in OWN_WORDS.items()), reverse=True)   # a word of its own weighs more
    (best, name), (second, _) = counts[0], counts[1]
    return name if best >= 1 and best > second else None


def _shown_in(value: Any, language: Language, query: Optional[QueryInput] = None) -> str:
    """A value as a reply in ``language`` shows it: yes or no in its words, a choice by its
    name there (``query`` is the input it is of)."""
    if isinstance(value, bool):
        return language.writes[shown_value(value)]
    if query is not None and query.type == "choice":
        return query.choice_in(language.code, value) or shown_value(value)
    return shown_value(value)


def question_offline(workflow: Workflow, missing: Sequence[QueryInput], understood: Mapping[str, Any],
                     changed: Mapping[str, Tuple[Any, Any]], problems: Mapping[str, str],
                     ambiguous: Optional[Mapping[str, Sequence[Any]]] = None, line_hint: bool = True,
                     language: Language = ENGLISH) -> str:
    """A templated question for the first missing input, naming the rest; "which one?" when
    the message named several values for it. In ``language`` (see reply_language)."""
    writes, code, inputs = language.writes, language.code, workflow.query_inputs
    def label(name: str) -> str:
        return inputs[name].label_in(code)
    parts = []
    if understood:
        parts.append(writes["understood"].format(values=_and_list(
            [writes["value"].format(label=label(name), value=_shown_in(value, language, inputs[name]))
             for name, value in understood.items()], language)))
    if changed:
        parts.append(writes["changed"].format(changes=_and_list(
            [writes["change"].format(label=label(name), old=_shown_in(old, language, inputs[name]),
                                     new=_shown_in(new, language, inputs[name]))
             for name, (old, new) in changed.items()], language)))
    parts += [reason[0].upper() + reason[1:] + "." for reason in problems.values()]
    first = missing[0]
    if len(missing) > 1:
        parts.append(writes["still_need"].format(labels=_and_list([label(query.name) for query in missing], language)))
    if ambiguous and first.name in ambiguous:
        parts.append(writes["which"].format(label=label(first.name),
                                            values=_or_list(ambiguous[first.name], language, first)))
    else:
        parts.append(first.question_in(code)
                     or f"Could you tell me the {first.label} ({first.description.rstrip('.')})?")
    if len(missing) > 1 and line_hint:
        parts.append(writes["several"].format(label=label(missing[1].name)))
    return " ".join(parts)


def _or_list(values: Sequence[Any], language: Language = ENGLISH, query: Optional[QueryInput] = None) -> str:
    shown = [_shown_in(value, language, query) for value in values]
    return ", ".join(shown[:-1]) + f" {language.writes['or']} " + shown[-1] if len(shown) > 1 else shown[0]


def _line_form(missing: Sequence[QueryInput], language: Language = ENGLISH) -> str:
    """The ``name: value`` lines the simple reader always understands, for what is missing."""
    return f"\n\n{language.writes['line_form']}\n\n" + "\n".join(
        f"    {query.label_in(language.code)}: ..." for query in missing)


def _nothing_read(text: str, asked: Sequence[str], extraction: Extraction) -> bool:
    """A reply to a question that gave nothing usable (a question back is not one)."""
    return bool(text and asked and extraction.intent in ("provide", "correct") and not extraction.values
                and not extraction.rejected and not extraction.ambiguous and not text.rstrip().endswith("?"))


def _and_list(items: Sequence[str], language: Language = ENGLISH) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + f" {language.writes['and']} " + items[-1]


def question_messages(workflow: Workflow, missing: Sequence[QueryInput], understood: Mapping[str, Any],
                      changed: Mapping[str, Tuple[Any, Any]], problems: Mapping[str, str], text: str,
                      ambiguous: Optional[Mapping[str, Sequence[Any]]] = None) -> List[dict]:
    """The question call's messages: what is missing, understood and refused in the system
    message, the user's new message as the user message."""
    known = "".join(f"- {workflow.query_inputs[name].label}: {shown_value(value)}\n"
                    for name, value in understood.items())
    known += "".join(f"- {workflow.query_inputs[name].label}: changed from {shown_value(old)} to {shown_value(new)}\n"
                     for name, (old, new) in changed.items())
    prompt = QUESTION_PROMPT.format(
        name=workflow.name, description=workflow.description,
        understood=f"Understood from the user's last message:\n{known}\n" if known else "",
        missing="\n".join(f"- {query.label}: {query.description}" for query in missing),
        problems="".join(f"Could not use a value: {reason}.\n" for reason in problems.values()) + "".join(
            f"The user named several values for the {workflow.query_inputs[name].label} ({_or_list(values)}): "
            "ask which one they mean.\n" for name, values in (ambiguous or {}).items()))
    return [{"role": "system", "content": prompt}, {"role": "user", "content": text}]


def question_with_llm(llm: LLMClient, workflow: Workflow, missing: Sequence[QueryInput],
                      understood: Mapping[str, Any], changed: Mapping[str, Tuple[Any, Any]],
                      problems: Mapping[str, str], text: str,
                      ambiguous: Optional[Mapping[str, Sequence[Any]]] = None) -> str:
    question = llm.complete(question_messages(workflow, missing, understood, changed, problems, text, ambiguous),
                            temperature=0, max_tokens=QUESTION_MAX_TOKENS).strip()
    if not question:
        raise UpstreamError("the language model returned an empty question")
    return question


QUESTION_MARK_PATTERN = re.compile(r"[?？][\W_]*\Z")   # a text that ends as a question does


class CheckedQuestion:
    """The LLM's question as it is written (``pieces``, a stream), given out part by part so
    that a person sees it as it comes, yet never sees text that has not passed ``check``:
    the text is held until it ends a question ("?"), and then given out only if the whole
    text so far passes the check. Each piece is also looked at alone for what can be seen at
    once (chat-template debris, the server's own prompt, too long): then the stream is closed
    at once, so a small model talking to itself is not waited for. After iterating,
    ``shown`` is the text given out and ``why`` the reason the rest (or all) was not used."""

    def __init__(self, pieces: Iterable[str], check: Callable[[str], Optional[str]],
                 max_chars: int = CHECKED_TEXT_MAX_CHARS):
        self._pieces, self._check, self._max_chars = pieces, check, max_chars
        self.shown, self.why = "", None   # type: str, Optional[str]

    def __iter__(self) -> Iterator[str]:
        written = ""
        try:
            for piece in self._pieces:
                written += piece
                self.why = _visible_problem(written.strip(), self._max_chars)
                if self.why:
                    return   # closed in finally: the upstream stops writing
                if QUESTION_MARK_PATTERN.search(written) and len(written.strip()) > len(self.shown):
                    if self._check(written.strip()) is None:
                        part, self.shown = written.strip()[len(self.shown):], written.strip()
                        yield part
            rest = written.strip()
            if rest != self.shown:   # what came after the last question, or no question at all
                self.why = self._check(rest) or ("it does not end as a question" if self.shown else None)
                if self.why is None:
                    part, self.shown = rest[len(self.shown):], rest
                    yield part
        except UpstreamError as exc:   # the call failed (or timed out) while it was written
            log.info("question call failed: %s", exc.message)
            self.why = None if not self.shown else f"the call failed ({exc.message})"
        finally:
            getattr(self._pieces, "close", lambda: None)()


def _visible_problem(text: str, max_chars: int) -> Optional[str]:
    """What makes a text the LLM is still writing unusable whatever comes next: too long,
    chat-template debris, or a run of the server's own prompt (check_llm_text's first checks)."""
    if len(text) > max_chars:
        return f"it is over {max_chars} characters long"
    return debris_or_echo(text)


####################################################################################
# The turn: one user message in, thinking and answer out
####################################################################################

CANCELLED_REPLY = "Okay, I've cleared everything and won't run anything. Tell me when you want to start again."
NOTHING_CHANGED_REPLY = 'Nothing changed, so I have not run it again. {change}say "again" to run it once more.'
RUN_FAILED_REPLY = ("Sorry, the workflow stopped: step {node!r} failed ({reason}). Your inputs are kept; "
                    'say "again" to retry, or change a value.')


class Piece(NamedTuple):
    """A piece of the reply, for the channel "thinking" (inside the <thinking> block) or "answer".
    The turn makes its pieces as plain (channel, text) tuples, and every reader unpacks them
    (``channel, text = piece``): a Piece is one too, with its fields named, for where one is
    made seldom. A Piece costs a constructor call to make and an attribute look-up to read;
    a plain tuple, neither, for the dozen pieces of every turn and each step they pass."""
    channel: str
    text: str


# A piece made a Piece without the NamedTuple's constructor (a Python call): the same Piece.
new_piece = partial(tuple.__new__, Piece)


def replay_offline(workflow: Workflow, conversation: Conversation, turns: Sequence[str]) -> Dict[str, Any]:
    """Rebuild values from earlier user turns the conversation has no record of (an unknown
    id, or replies it no longer keeps), each read as the offline reader read it when it came:
    a bare "Paris" is the answer to the question before it. Returns the values it ends with."""
    for text in turns:
        extraction = extract_offline(workflow, conversation, text)
        if extraction.intent == "cancel":
            conversation.values.clear()
        conversation.values.update(extraction.values)
        missing = conversation.missing(workflow)
        conversation.asked = [missing[0].name] if missing else []   # offline asks one at a time
    return dict(conversation.values)


@dataclass(init=False)
class TurnRequest:
    """One turn asked for, whatever API it came by."""
    model: str
    messages: List[dict]                  # {"role", "content"}: the history, the new user text last
    id_block: bool = True                 # the first reply carries the conversation in an identifier block
    chat_key: str = ""                    # the conversation header's value, when keyed by it
    previous_response_id: str = ""        # Responses: continue from this stored response
    store_response: bool = False          # Responses: keep this turn as a response (``store``)
    response_extra: Dict[str, Any] = field(default_factory=dict)   # stored with it: metadata, usage, ...
    response_id: str = ""                 # set once the conversation is known
    conversation: str = ""                # Responses: the Conversations API conversation it continues, its id
    conversation_hints: List[str] = field(default_factory=list)   # Responses: conversations its items' ids name
    saving: Optional[Callable[["Conversation", str, str], None]] = None   # with thinking, answer, at the save

    def __init__(self, model: str, messages: List[dict], id_block: bool = True, chat_key: str = "",
                 previous_response_id: str = "", store_response: bool = False,
                 response_extra: Optional[Dict[str, Any]] = None, response_id: str = "", conversation: str = "",
                 conversation_hints: Optional[List[str]] = None,
                 saving: Optional[Callable[["Conversation", str, str], None]] = None) -> None:
        # One is made every turn: the dataclass's __init__, with its two default factories,
        # costs a third more than this one (and more still called with keywords, as
        # chat_completions does not).
        self.model = model; self.messages = messages; self.id_block = id_block; self.chat_key = chat_key
        self.previous_response_id = previous_response_id; self.store_response = store_response
        self.response_extra = {} if response_extra is None else response_extra
        self.response_id = response_id; self.conversation = conversation
        self.conversation_hints = [] if conversation_hints is None else conversation_hints
        self.saving = saving


SORRY_REPLY = "Sorry, something went wrong on the server while answering. Your conversation is kept."


def ordered_pieces(pieces: Iterable[Piece], written: Mapping[str, List[str]], last: str = "") -> Iterator[Piece]:
    """The turn's pieces as every API shows them: thinking, then the answer. Progress that comes
    after the answer has begun (the node that streams the answer finishing, a side branch) is
    held and shown after the answer, so the record of the run is whole; a bug in the turn ends
    the answer with an apology rather than a broken reply. ``last``, if any, ends the answer once
    all is out (a new conversation's id block). Each piece is kept in ``written``
    ({channel: texts}) as it goes out."""
    thinking, answer = written["thinking"], written["answer"]
    held: List[str] = []   # thinking that came once the answer had begun
    pieces = iter(pieces)
    try:
        for piece in pieces:   # thinking, up to the answer's first piece
            channel, text = piece
            if channel == "answer":
                answer.append(text)
                yield piece
                break
            thinking.append(text)
            yield piece
        for piece in pieces:   # the answer: thinking is held until it is whole
            channel, text = piece
            if channel == "thinking":
                held.append(text)
            else:
                answer.append(text)
                yield piece
        if held:
            thinking.append("".join(held))
            yield ("thinking", thinking[-1])
    except Exception:   # the turn's own bug
        log.exception("turn failed")
        answer.append(SORRY_REPLY)
        yield ("answer", SORRY_REPLY)
    if last:
        answer.append(last)
        yield ("answer", last)


@dataclass(slots=True)   # one a turn: its fields are stored with no dict
class TurnContext:
    """Everything one turn needs, so the turn logic holds no server state of its own."""
    workflow: Workflow
    conversation: Conversation
    history: List[dict]
    text: str
    llm: Optional[LLMClient]
    node_types: Mapping[str, NodeType]
    stop: threading.Event = field(default_factory=StopSignal)
    restored: Optional[Mapping[str, Any]] = None   # values read again from the history (unknown id)
    branch: str = ""                               # "earlier" (an older reply continued) or "new chat"
    answer: Optional[str] = None                   # the workflow's answer, when it ran
    metrics: Optional["Metrics"] = None


def play_turn(turn: TurnContext) -> Iterator[Piece]:
    """Gather what the new message gives; ask for what is missing, or run the workflow."""
    workflow, conversation = turn.workflow, turn.conversation
    conversation.turns += 1
    # The turn's own LLM calls (extraction, question): one attempt each, all within --llm-timeout,
    # and cut as soon as the client leaves.
    budget = TurnBudget(turn.stop, turn.llm.settings.timeout_seconds) if turn.llm is not None else None
    own_calls = (lambda: turn.llm.within(budget)) if turn.llm is not None else contextlib.nullcontext
    # The thinking lines written one after another, with no wait between them (no LLM call, no
    # node run), go out as one piece: a piece less to pass on for each, the same text. Held
    # lines always go out before anything that waits.
    lines = ""
    if turn.branch == "new chat":   # a reused header key (Open WebUI's temporary chats share one)
        lines = "A new chat: starting from nothing.\n"
    elif turn.branch:
        known = ", ".join(f"{workflow.query_inputs[name].label} = {shown_value(value)}"
                          for name, value in conversation.values.items() if name in workflow.query_inputs)
        lines = ("Continuing from an earlier reply of this chat (a message edited or sent "
                 f"again, or an older branch): {known or 'nothing gathered yet'}.\n")
    if turn.restored:
        shown = ", ".join(f"{workflow.query_inputs[name].label} = {shown_value(value)}"
                          for name, value in turn.restored.items())
        lines += f"Read the earlier messages again: {shown}.\n"
    if turn.text and workflow.query_inputs:
        lines += _reading_line(workflow, conversation)
        extraction, reading = read_floor(workflow, conversation, turn.text, turn.history)
        if turn.llm is not None:   # what the simple reader decided is shown while the LLM reads
            if extraction.values and extraction.intent != "cancel":
                found = ", ".join(f"{workflow.query_inputs[name].label} {shown_value(value)}"
                                  for name, value in extraction.values.items())
                lines += f"Found so far: {found} (the language model is reading it too).\n"
            yield ("thinking", lines)
            lines = ""
            with own_calls():
                extraction = extract_on_floor(turn.llm, workflow, conversation, turn.history, reading.tokens.text,
                                              extraction, reading)
    else:   # nothing to read
        extraction = Extraction()
    if extraction.notes:   # seldom any: a loop over none costs as much as a line
        for note in extraction.notes:
            lines += note + "\n"
    if extraction.intent == "cancel":
        conversation.values.clear()
        conversation.asked, conversation.ask_counts = [], {}
        yield ("thinking", lines + "You asked to stop: cleared every value.\n")
        yield ("answer", CANCELLED_REPLY)
        return
    understood, changed = {}, {}   # the values new to the conversation, and those it had otherwise
    for name, value in extraction.values.items():
        if name not in conversation.values:
            understood[name] = value
        elif conversation.values[name] != value:
            changed[name] = (conversation.values[name], value)
    lines += _describe_extraction(workflow, extraction, understood, changed)
    conversation.values.update(extraction.values)
    if conversation.ask_counts:   # most conversations were asked nothing yet
        for name in extraction.values:
            conversation.ask_counts.pop(name, None)
    missing = workflow.missing(conversation.values)
    if missing:
        if lines:
            yield ("thinking", lines)
        with own_calls():
            yield from _ask(turn, missing, extraction, understood, changed, budget)
        return
    conversation.asked = []
    if conversation.runs and not understood and not changed and not RERUN_PATTERN.search(turn.text):
        if lines:
            yield ("thinking", lines)
        yield from _answer_again(turn)   # "thanks!", or Open WebUI's "Add Details" (decision in the README)
        return
    news = [f"the {workflow.query_inputs[name].label} from {shown_value(old)} to {shown_value(new)}"
            for name, (old, new) in changed.items()] if changed else []
    if conversation.runs:   # after a run, an optional input given now is news too
        news += [f"the {workflow.query_inputs[name].label} to {shown_value(value)}" for name, value in understood.items()]
    preface = ("Changed " if changed else "Set ") + _and_list(news) + ".\n\n" if news else ""
    yield from _run(turn, preface, thinking=lines)


def _reading_line(workflow: Workflow, conversation: Conversation) -> str:
    """The thinking line that says what a message is read for. A conversation's first message
    is read for every required input: that line is written once per workflow."""
    if conversation.values:
        return _reading_line_for(conversation.missing(workflow))
    line = workflow.derived.get("reading_line")
    if line is None:
        line = workflow.derived["reading_line"] = _reading_line_for(workflow.missing({}))
    return line


def _reading_line_for(wanted: Sequence[QueryInput]) -> str:
    return f"Reading your message for the {_and_list([q.label for q in wanted])}.\n" if wanted else \
        "Reading your message for changes.\n"


def _answer_again(turn: TurnContext) -> Iterator[Piece]:
    """After a run, a message that changes no value never replaces the result with a
    non-answer (Open WebUI shows a regenerated reply in place of the last one).
    With an LLM writing the answer, it reworks the last answer as the message asks ("More
    Concise"); otherwise the last result comes again, and the thinking block says why."""
    workflow, conversation = turn.workflow, turn.conversation
    last, source = conversation.last_result(), workflow.answer_source()
    if last and turn.llm is not None and source and workflow.node(source).type == "llm":
        yield ("thinking", "Your message changes no value: the last answer is written again as it asks.\n")
        yield from _run(turn, follow_up=(last, turn.text))
    elif last:
        yield ("thinking", 'Your message changes no value, so this is the last result again. Change a value, '
                           'or say "again" to run it once more.\n')
        yield ("answer", last)
        turn.answer = last
    else:   # a conversation stored before results were kept
        first = next(iter(workflow.query_inputs.values()), None)
        change = f'Change a value (for example "{first.label}: ...") or ' if first else ""
        yield ("answer", NOTHING_CHANGED_REPLY.format(change=change))


def _describe_extraction(workflow: Workflow, extraction: Extraction, understood: Mapping[str, Any],
                         changed: Mapping[str, Tuple[Any, Any]]) -> str:
    """The thinking lines for what the message gave, changed or could not give, as one text:
    they are written at once, so they go out as one piece ("" when there are none)."""
    # A text of lines, each test before its loop: most dicts here are empty, and a loop over an
    # empty one costs as much as a line. A value that is text or a whole number is shown
    # without shown_value's call (most values are).
    queries, lines = workflow.query_inputs, ""
    for name, value in understood.items():
        kind = type(value)
        lines += (f"Understood {queries[name].label}: "
                  f"{value if kind is str else str(value) if kind is int else shown_value(value)}.\n")
    if changed:
        for name, (old, new) in changed.items():
            lines += f"Changed {queries[name].label}: {shown_value(old)} → {shown_value(new)}.\n"
    if extraction.ignored:
        for name, (raw, why) in extraction.ignored.items():
            lines += f"Ignored {queries[name].label} = {raw!r}: {why}.\n"
    if extraction.ambiguous:
        for name, values in extraction.ambiguous.items():
            lines += (f"Your message names several values for the {queries[name].label} ({_or_list(values)}): "
                      "asking which.\n")
    if extraction.rejected:
        for name, reason in extraction.rejected.items():
            lines += f"Could not use the {queries[name].label}: {reason}.\n"
    if extraction.intent == "skip":
        lines += ("You asked to skip an input; only optional inputs can be left out, "
                  "and those are never asked for.\n")
    return lines


def _ask(turn: TurnContext, missing: List[QueryInput], extraction: Extraction, understood: Mapping[str, Any],
         changed: Mapping[str, Tuple[Any, Any]], budget: Optional[TurnBudget] = None) -> Iterator[Piece]:
    """One question for what is missing, or, after three unanswered asks, an offer to start over,
    as answer pieces; and the lines for the thinking block (why the LLM's question was not used).
    A question call of its own is streamed as it is written, each part checked (CheckedQuestion)."""
    workflow, conversation = turn.workflow, turn.conversation
    ambiguous = {name: values for name, values in extraction.ambiguous.items() if name not in conversation.values}
    missing = sorted(missing, key=lambda query: query.name not in ambiguous)   # "which one?" first
    first = missing[0]
    messages = [m["content"] for m in turn.history if m["role"] == "user"] + [turn.text]
    if conversation.ask_counts.get(first.name, 0) >= MAX_ASKS_PER_INPUT and not extraction.values:
        conversation.asked = [first.name]
        language = reply_language(workflow, [first.name], first, messages, {})
        yield ("answer", language.writes["give_up"].format(
            label=first.label_in(language.code), tries=MAX_ASKS_PER_INPUT,
            line=first.name if language is ENGLISH else first.label_in(language.code)))
        return
    problems = {name: reason for name, reason in extraction.rejected.items() if name not in conversation.values}
    asked_before = [name for name in conversation.asked if name in workflow.query_inputs]
    nothing_read = _nothing_read(turn.text, asked_before, extraction)
    def check(text: str) -> Optional[str]:   # what the user said and their language: only for an LLM's text
        said = messages + [shown_value(value) for value in conversation.values.values()]
        return check_llm_text(text, workflow, said, users_language(messages))
    blamed: List[str] = []
    if nothing_read:   # the input the message talks of, if not the one asked
        words = set(_words(turn.text))
        named = [name for name, query in workflow.query_inputs.items() if words & _topic_words(query)]
        blamed = named if named and not set(named) <= set(asked_before) else asked_before
    language = reply_language(workflow, [*understood, *changed, *blamed, *(query.name for query in missing)],
                              first, messages, problems,
                              [*understood.items(), *((name, value) for name, pair in changed.items() for value in pair),
                               *((name, value) for name, values in ambiguous.items() for value in values)])
    question, notes = None, []
    opening, closing = "", ""
    if nothing_read:   # say what was not understood, and the form that always is
        quoted = turn.text if len(turn.text) <= 80 else turn.text[:77].rstrip() + "..."
        opening = language.writes["not_read"].format(
            labels=_and_list([workflow.query_inputs[name].label_in(language.code) for name in blamed], language),
            text=quoted)
        closing = _line_form(missing, language)
    if extraction.question is not None:
        # The extraction call wrote the question assuming its values were taken. It asks for the
        # right inputs only when they were, and the simple reader took nothing it did not give;
        # otherwise the question is templated, with no second call.
        why = ("a value it read was not used" if extraction.ignored or extraction.rejected or ambiguous else
               "it was written before the simple reader found more" if not set(understood) <= extraction.question_assumes
               else check(extraction.question))
        if why is None:
            question = extraction.question
        else:
            notes.append(f"The language model's question was not used: {why}.")
    elif turn.llm is not None and not extraction.llm_failed and not turn.llm.asks_in_extraction:
        checked = CheckedQuestion(_question_stream(turn.llm, budget, workflow, missing, understood, changed, problems,
                                                   turn.text, ambiguous),
                                  check)
        for part in checked:
            yield ("answer", opening + part)
            opening = ""   # said once, before the question's first part
        if checked.shown:   # part of it, at least, was a checked question: the rest is left out
            if checked.why:
                yield ("thinking", f"The rest of the language model's question was not used: {checked.why}.\n")
            question = ""
        elif checked.why:
            notes.append(f"The language model's question was not used: {checked.why}.")
    for note in notes:
        yield ("thinking", note + " Asked the templated question instead.\n")
    if question is not None:
        conversation.asked = [query.name for query in missing]
        if question:
            yield ("answer", opening + question)
    else:
        yield ("answer", opening + question_offline(workflow, missing, understood, changed, problems, ambiguous,
                                                    line_hint=not nothing_read, language=language))
        conversation.asked = [first.name]   # offline asks one at a time, so the reply can be read
    if closing:
        yield ("answer", closing)
    if not extraction.values:   # a reply that changed or gave something was an answer I could use
        for name in conversation.asked:
            conversation.ask_counts[name] = conversation.ask_counts.get(name, 0) + 1


def _question_stream(llm: LLMClient, budget: Optional[TurnBudget], workflow: Workflow, missing: Sequence[QueryInput],
                     understood: Mapping[str, Any], changed: Mapping[str, Tuple[Any, Any]],
                     problems: Mapping[str, str], text: str, ambiguous: Mapping[str, Sequence[Any]]) -> Iterator[str]:
    """The question call, streamed within what is left of the turn's budget (none: nothing)."""
    left = budget.left() if budget is not None else llm.settings.timeout_seconds
    if left <= 0.05:
        log.warning("no time left of the turn's %g s for the question call", llm.settings.timeout_seconds)
        return iter(())
    return iter(llm.stream(question_messages(workflow, missing, understood, changed, problems, text, ambiguous),
                           within_seconds=left, stop=budget.stop if budget is not None else None,
                           temperature=0, max_tokens=QUESTION_MAX_TOKENS, retry=False))   # one attempt


def _run(turn: TurnContext, preface: str = "", follow_up: Optional[Tuple[str, str]] = None,
         thinking: str = "") -> Iterator[Piece]:
    """Run the workflow, every required input set: progress as thinking, then ``preface`` and the
    answer. ``thinking``, lines written just before, go out with the run's first line, as one piece."""
    workflow, conversation = turn.workflow, turn.conversation
    given = conversation.values
    if not workflow.has_optional_inputs:   # every input is required, so given by now: no default to add
        values = dict(given)
    else:
        values = workflow.with_defaults(given)
        if len(values) > len(given):   # some defaults
            for name in values:
                if name not in given:   # a default
                    thinking += (f"Using the default {workflow.query_inputs[name].label}: "
                                 f"{shown_value(values[name])}.\n")
    queries, shown = workflow.query_inputs, []
    for name, value in values.items():   # a loop: a comprehension would be one more call each turn
        kind = type(value)   # text and whole numbers, most values, shown with no call
        shown.append(f"{queries[name].label} = "
                     f"{value if kind is str else str(value) if kind is int else shown_value(value)}")
    held = f"{thinking}Running {workflow.name} with {', '.join(shown)}.\n"   # thinking not yet out
    # A chain's first node starts at once, and each next one as soon as the one before finishes:
    # the line before a "started" goes out with it, one piece. Nodes side by side may wait first.
    chain = workflow.chain is not None
    if not chain:
        yield ("thinking", held)
        held = ""
    conversation.runs += 1
    written = ""   # the answer streamed so far: a stop notice after it gets a paragraph of its own
    try:   # the run's events as the plain tuples they are made as (no RunEvent made for each)
        for event in _run_events(workflow, values, turn.node_types, turn.llm, turn.stop, follow_up, turn.metrics):
            what, node_id, text, seconds, _ = event
            if what == "answer":
                if held:
                    yield ("thinking", held)
                    held = ""
                yield ("answer", preface + text)
                written, preface = (written + text)[-2:], ""
            elif what == "done":
                turn.answer = text
            elif what == "started":
                yield ("thinking", held + _started_line(node_id, text))
                held = ""
            elif what == "finished":   # every node's, so written here, with no call to progress_line
                # Most nodes (templates, outputs) take under 5 ms, which shows as 0.00 s: that line is
                # the same each time, so made once, with no float formatted (.2f rounds below 0.005 down).
                line = _finished_at_once_line(node_id) if 0.0 < seconds < 0.005 else \
                    RUN_MARKS["finished"] + finished_text(node_id, seconds) + "\n"
                if chain:   # out with what comes next, at once
                    held += line
                else:
                    yield ("thinking", line)
            else:   # a node's progress (RUN_MARKS)
                yield ("thinking", held + RUN_MARKS[what] + progress_line(new_event(event)) + "\n")
                held = ""
                if what == "failed":
                    yield ("answer", (paragraph_break(written) if written else preface) +
                           RUN_FAILED_REPLY.format(node=node_id, reason=text))
    except Exception:   # a bug in the run: what it had written still goes out, before the bug's apology
        if held:
            yield ("thinking", held)
        raise
    if held:
        yield ("thinking", held)


RUN_MARKS = {"started": "→ ", "finished": "✓ ", "failed": "✗ ", "note": ""}   # how the thinking block shows them


@lru_cache(maxsize=256)   # a workflow's few nodes, started turn after turn
def _started_line(node_id: str, description: str) -> str:
    """A node's "started" line for the thinking block: the same each time it runs, so made once."""
    return RUN_MARKS["started"] + progress_line(RunEvent("started", node_id, description)) + "\n"


@lru_cache(maxsize=256)
def _finished_at_once_line(node_id: str) -> str:
    """A node's "finished" line for the thinking block when it took under 5 ms: made once."""
    return RUN_MARKS["finished"] + finished_text(node_id, 0.0) + "\n"


def paragraph_break(text: str) -> str:
    """What starts a new paragraph after ``text`` (the end of an answer already sent, which
    cannot be changed): a blank line, less what it already ends with."""
    return "\n\n"[len(text) - len(text.rstrip("\n")):]


def finished_text(node_id: str, seconds: float) -> str:
    return f"{node_id} finished in {seconds:.2f} s"


def progress_line(event: RunEvent) -> str:
    """A node's event as one line, as the thinking block and MCP progress both tell it."""
    if event.what == "started":
        return f"{event.node_id} started{': ' + event.text if event.text else ''}"
    if event.what == "finished":
        return finished_text(event.node_id, event.seconds)
    if event.what == "failed":
        return f"{event.node_id} failed after {event.seconds:.2f} s: {event.text}"
    return f"{event.node_id}: {event.text}"


def run_events(workflow: Workflow, values: Mapping[str, Any], *, node_types: Mapping[str, NodeType],
               llm: Optional[LLMClient], stop: threading.Event, metrics: Any = None,
               follow_up: Optional[Tuple[str, str]] = None) -> Iterator[RunEvent]:
    """MCP's run: run_workflow's events, counted in the metrics (runs by outcome, failed nodes
    by type); closing it stops the run."""
    return run_workflow(workflow, values, node_types=node_types, llm=llm, stop=stop, follow_up=follow_up,
                        metrics=metrics)


def with_keepalives(texts: Iterator[Any], interval_seconds: float, stop: threading.Event) -> Iterator[Any]:
    """The texts, produced in a thread of their own, with a None each ``interval_seconds`` the
    turn is silent, so a long node does not let a proxy cut the stream. Closing this generator
    (the client is gone, or the reply is over) tells the producer to stop and waits for it."""
    pipe: "queue.SimpleQueue[Any]" = queue.SimpleQueue()   # unbounded, as Queue() was, and a C call per piece
    finished = object()

    def produce() -> None:
        try:
            for text in texts:
                pipe.put(text)
                if stop.is_set():
                    break
        except Exception:   # a bug in what is produced: the stream still ends
            log.exception("a streamed reply failed")
        finally:
            try:
                getattr(texts, "close", lambda: None)()   # closed on the thread that ran it
            finally:
                pipe.put(finished)   # whatever happened, the stream ends
    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    try:
        while True:
            try:
                item = pipe.get(timeout=interval_seconds)
            except queue.Empty:
                yield None
                continue
            if item is finished:
                return
            yield item
    finally:
        stop.set()
        producer.join()   # nothing runs on after this generator is closed: its closer may save now


class Service:
    """The server's state: its workflows, store, LLM and node types, and how a turn is opened
    on them. Routes hold one; every wire format opens its turns here."""

    def __init__(self, workflows: Mapping[str, Workflow], store: "Store", llm: Optional[LLMClient],
                 node_types: Mapping[str, NodeType], metrics: Any, api_keys: Sequence[str] = (),
                 keepalive_seconds: float = KEEPALIVE_SECONDS, thinking: str = "tags",
                 conversation_header: Optional[str] = None, workflows_source: str = ""):
        self.workflows = workflows
        self.workflows_source = workflows_source
        self.metrics = metrics
        self.store = store
        self.llm = llm
        self.node_types = node_types
        # One key given as a plain string must not become one key per character.
        self.api_keys = tuple(key for key in ([api_keys] if isinstance(api_keys, str) else api_keys) if key)
        self.keepalive_seconds = keepalive_seconds
        self.thinking = thinking
        self.conversation_header = conversation_header
        self.new_conversation_id = ConversationIds()
        self._next_expiry = 0.0

    def workflow(self, model_id: str) -> Workflow:
        if model_id not in self.workflows:
            raise ModelNotFoundError(f"The model {model_id!r} does not exist; GET /openai/models lists them.",
                                     param="model")
        return self.workflows[model_id]

    def open_turn(self, request: TurnRequest, stop: Optional[threading.Event] = None,
                  trace: Optional[Dict[str, str]] = None) -> "Turn":
        """A turn, opened: its conversation locked and loaded. Errors found before any piece (an
        unknown model, a store that is down, an unknown previous response) are raised here,
        so that they are answered as errors before a reply starts. Close what this returns."""
        workflow = self.workflows.get(request.model)
        if workflow is None:   # self.workflow's error; the look-up is made here, without its call
            workflow = self.workflow(request.model)
        trace = {} if trace is None else trace
        trace["model"] = workflow.name
        if time.monotonic() >= self._next_expiry:   # tested here: most turns make no call for it
            self._expire_now_and_then()
        turn = Turn(self, workflow, request, stop or StopSignal(), trace)
        try:
            turn.open()
        except BaseException:
            turn.close()
            raise
        return turn

    def _expire_now_and_then(self) -> None:
        """Expire old conversations at most once per EXPIRE_EVERY_SECONDS, off the request path."""
        if time.monotonic() < self._next_expiry:
            return
        self._next_expiry = time.monotonic() + EXPIRE_EVERY_SECONDS
        threading.Thread(target=self.store.expire, daemon=True).start()


class HeldLock:
    """The one conversation lock a turn holds, from its open to its close: an ExitStack with
    room for one lock (its layers of callbacks cost every turn several calls). Exiting
    releases it, with the exception that ended the block, as ExitStack would."""

    # A class default, not an __init__: one is made every turn, and a call would cost more than the object.
    _lock: Optional["contextlib.AbstractContextManager[Any]"] = None

    def enter_context(self, lock: "contextlib.AbstractContextManager[Any]") -> None:
        """Take ``lock`` and hold it; only one at a time (release the last first)."""
        assert self._lock is None, "a turn holds one conversation lock at a time"
        lock.__enter__()
        self._lock = lock

    def release(self) -> None:
        self.__exit__(None, None, None)

    def __enter__(self) -> "HeldLock":
        return self

    def __exit__(self, *exc_info: Any) -> Optional[bool]:
        lock, self._lock = self._lock, None
        return lock.__exit__(*exc_info) if lock is not None else None


class Turn:
    """One turn on one conversation, from its lock to its save.

    ``Service.open_turn`` opens it: the conversation is locked and loaded on the calling
    thread. ``pieces()`` plays it. ``close()`` stops what still runs, saves and unlocks, on the
    thread that opened it, once: when the last piece has been read, or else (the client left,
    an error) by the ``with`` block around a whole reply or by StreamedTurn when the WSGI
    server ends a stream. Wire formats only read the pieces, so none of them can hold a lock
    or forget to free one.
    """

    def __init__(self, service: Service, workflow: Workflow, request: TurnRequest, stop: threading.Event,
                 trace: Dict[str, str]):
        self.service, self.workflow, self.request, self.stop, self.trace = service, workflow, request, stop, trace
        self.conversation: Optional[Conversation] = None
        self._held = HeldLock()   # the conversation's lock, entered in open()
        self._arrived = time.time()
        self._written: Dict[str, List[str]] = {"thinking": [], "answer": []}
        self._playing: Optional[Iterator[Any]] = None   # the pieces being read, closed in close()
        self._game: Optional[Iterator[Piece]] = None      # play_turn, closed in close() after them
        self._block = ""                        # the identifier block that ends the reply, if it has one
        self._context: Optional[TurnContext] = None
        self._closed = False
        self._digest = ""                       # request_digest, for a twin sent while this one runs
        self._twin: Optional[dict] = None       # this request's answer, given while it waited: a repeat

    def __enter__(self) -> "Turn":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def open(self) -> None:
        service, workflow, request = self.service, self.workflow, self.request
        messages, held = request.messages, self._held
        if request.previous_response_id:
            conversation = resume_response(service, workflow, request.previous_response_id, held)
            recovered, history, text = False, [], split_new_messages(messages)[1]
            branch, again = "", []
        elif request.conversation:   # its items are the history; the new input follows them
            conversation = resume_api_conversation(service, workflow, request.conversation, held)
            messages = request.messages = item_messages(conversation.api["items"]) + list(messages)
            history, text = split_new_messages(messages)
            if not text:
                raise RequestError("Nothing new to answer: the conversation ends with an answer and 'input' adds "
                                   "no user message.", param="input")
            recovered = False
            branch, again = branch_of(conversation, messages, self._arrived)
        else:
            if request.chat_key:
                conversation, recovered = resume_by_key(service, workflow, messages, request.chat_key, held)
            else:
                conversation, recovered = resume_by_id_block(service, workflow, messages, held,
                                                             request.conversation_hints)
            history, text = split_new_messages(messages)
            # No snapshot (a new conversation): its state is the empty one already, as branch_of would say.
            branch, again = ("", []) if recovered or not conversation.snapshots else \
                branch_of(conversation, messages, self._arrived)
        self.conversation = conversation
        self.trace["conversation"] = conversation.id[:6]
        if request.store_response:
            request.response_id = new_response_id(conversation.id)
        # A stored response, or a conversation of the Conversations API, goes on from its own state: never a
        # twin. Nor a conversation this request has just made: its twin, naming no conversation either, makes its own.
        if not request.previous_response_id and not request.conversation and not conversation.is_new:
            self._digest = request_digest(request.model, messages, request.chat_key)
            self._twin = conversation.twin_of(self._digest, self._arrived)
            if self._twin is not None:
                return   # answered while it waited for the lock: given again, nothing read twice
        recovered = recovered or branch == "unknown"   # none of its replies kept: read the history again
        restored, reading = None, text
        if again:   # turns edited in place, with our replies after them kept
            restored, branch = replay_offline(workflow, conversation, again), "earlier"
        elif recovered and service.llm is None:   # replay the earlier turns first, as they came
            restored = replay_offline(workflow, conversation, user_turns(history))
        elif recovered:   # the LLM reads every user message at once, in order
            history, reading = [], "\n".join(m["content"] for m in messages if m["role"] == "user")
        self._context = TurnContext(workflow, conversation, history, reading, service.llm, service.node_types,
                                    self.stop, restored, "" if branch == "unknown" else branch,
                                    metrics=service.metrics)

    def pieces(self, keepalive_seconds: Optional[float] = None) -> Iterator[Optional[Piece]]:
        """The turn's pieces, thinking then answer, with secrets redacted, produced as they are
        read. With ``keepalive_seconds``, they are produced in a thread of their own and a None
        comes each time the turn is silent that long (so a proxy keeps a long stream open)."""
        if keepalive_seconds is None:   # read on this thread, which closes the turn at the end itself
            self._playing = itertools.chain(self._play(), self._closing())   # chain: no step more per piece
            return self._playing
        self._playing = with_keepalives(self._play(), keepalive_seconds, self.stop)
        return self._closed_at_the_end(self._playing)

    def _closing(self) -> Iterator[Piece]:
        """No piece: the turn closed once the pieces before it are all read, as _closed_at_the_end does."""
        self.close()
        yield from ()

    def _closed_at_the_end(self, pieces: Iterator[Optional[Piece]]) -> Iterator[Optional[Piece]]:
        """The pieces; once they are all read, the turn closes at once (on the reader's thread,
        the one that opened it): saved before the reply's last bytes go out, so a client
        that has read the whole reply finds its turn kept."""
        yield from pieces
        self.close()

    def _play(self) -> Iterator[Piece]:
        """The pieces, in order, kept as written for the save, then redacted. Iterators are
        chained rather than wrapped in a generator of their own: each would add a step per piece."""
        if self._twin is not None:
            return iter([Piece("thinking", self._twin["thinking"]), Piece("thinking", REPEAT_NOTE),
                         Piece("answer", self._twin["answer"])])
        assert self._context is not None
        self._game = play_turn(self._context)
        pieces = ordered_pieces(self._game, self._written, self._id_block())   # the block once all is over
        if not self.workflow.has_secrets:   # a workflow with no secrets skips a step per piece
            return pieces
        return map(new_piece, self.workflow.redact.stream(pieces))   # a piece is the (channel, text) it reads

    def _id_block(self) -> str:
        """The first reply's last piece, the id block ("" for any other reply), kept for the save
        from the start: whether the reply ends with it, the save sees (clean_own_reply)."""
        assert self.conversation is not None
        if self.conversation.is_new and self.request.id_block and not self.request.chat_key:
            self._block = id_block(self.conversation.id)
        return self._block

    def close(self) -> None:
        """Stop what still runs, save what the turn did, and unlock. Safe to call again."""
        if self._closed:
            return
        self._closed = True
        with self._held:   # unlocks last, whatever saving does
            self.stop.set()
            for playing in (self._playing, self._game):   # outside in; a stream's producer is joined first
                if getattr(playing, "close", None) is not None:   # a chain of pieces has nothing to close
                    playing.close()
            if self.conversation is not None and self._twin is not None:
                self._save_repeat()
            if self.conversation is None or self._context is None:
                return   # not loaded, or a repeat: nothing to save
            self._save()

    def _save(self) -> None:
        workflow, conversation, request = self.workflow, self.conversation, self.request
        assert conversation is not None and self._context is not None
        answer = "".join(self._written["answer"])
        # The thinking is kept only with a stored response or a request's answer (for its twin).
        kept = request.response_id or request.saving is not None or self._digest
        thinking = "".join(self._written["thinking"]) if kept else ""
        if workflow.has_secrets:   # most workflows have none: no call to the Redactor
            answer, thinking = workflow.redact(answer), workflow.redact(thinking) if kept else ""
        # Only a new conversation's reply ends with its identifier block, if _id_block wrote it (a
        # reply that does not end with it is cleaned as clean_reply would, so none is looked for).
        key = conversation.remember(answer, users_digest(request.messages), self._context.answer,
                                    self.service.new_conversation_id.snapshot_id(), self._block)
        if request.response_id:
            conversation.keep_response(request.response_id, key, thinking, answer, request.response_extra)
        if request.saving is not None:
            request.saving(conversation, thinking, answer)
        if self._digest:
            conversation.answer_request(self._digest, thinking, answer, key)
        conversation.updated = time.time()
        self.service.store.save(conversation.id, conversation.to_record())
        self.service.metrics.count_turn(workflow.name, time.time() - self._arrived)


    def _save_repeat(self) -> None:
        """A repeat changes nothing; a stored response of it (Responses API) continues where its twin's does."""
        conversation, twin = self.conversation, self._twin
        assert conversation is not None and twin is not None
        if self.request.response_id:
            conversation.keep_response(self.request.response_id, twin["snapshot"], twin["thinking"] + REPEAT_NOTE,
                                       twin["answer"], self.request.response_extra)
            self.service.store.save(conversation.id, conversation.to_record())
        self.service.metrics.add("repeated_requests_total", model=self.workflow.name)


REPEAT_NOTE = ("This request is the same as one answered while it waited (a double click, or a client's retry): "
               "this is that answer again, and nothing was read twice.\n")


class AnsweredTurn:
    """A turn that touches no conversation, its answer known at once (a client's background
    task, a "continue"): the same interface as Turn, with nothing to lock or save."""

    def __init__(self, answer: str):
        self._pieces = [Piece("answer", answer)] if answer else []

    def __enter__(self) -> "AnsweredTurn":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def pieces(self, keepalive_seconds: Optional[float] = None) -> Iterator[Optional[Piece]]:
        return iter(self._pieces)

    def close(self) -> None:
        pass


def resume_response(service: Service, workflow: Workflow, response_id: str, held: HeldLock) -> Conversation:
    """The conversation behind a stored response, set to the state right after it (so two
    responses that continue the same one each get their own branch)."""
    try:
        conversation_id = conversation_of_response(response_id)
    except NotFoundError:
        conversation_id, record = "", None
    else:
        held.enter_context(service.store.lock(conversation_id))
        record = service.store.load(conversation_id)
    response = (record or {}).get("responses", {}).get(response_id)
    if record is None or response is None or record.get("model") != workflow.name:
        raise RequestError(f"No stored response {response_id!r} of the model {workflow.name!r}; send the "
                           "whole conversation as input, or start a new one.", param="previous_response_id")
    conversation = Conversation.from_record(record)
    if conversation.continue_from_key(response["snapshot"]) is None:
        raise RequestError(f"The response {response_id!r} is older than what the conversation keeps; send the "
                           "whole conversation as input instead.", param="previous_response_id")
    return conversation


def resume_api_conversation(service: Service, workflow: Workflow, conversation_id: str,
                            held: HeldLock) -> Conversation:
    """A conversation made with the Conversations API, locked for this turn; its first response
    gives it its model, and it keeps that one."""
    held.enter_context(service.store.lock(conversation_id))
    record = service.store.load(conversation_id)
    if record is None or record.get("api") is None:
        raise NotFoundError(f"Conversation with id 'conv_{conversation_id}' not found.", param="conversation")
    if record.get("model") not in ("", workflow.name):
        raise RequestError(f"The conversation 'conv_{conversation_id}' is with the model {record['model']!r}; a "
                           "conversation keeps the workflow of its first response.", param="conversation")
    conversation = Conversation.from_record(dict(record, model=workflow.name))
    return conversation


def branch_of(conversation: Conversation, messages: Sequence[dict], arrived: float) -> Tuple[str, List[str]]:
    """Set the conversation to the state this request continues from, and say how: "" (its
    latest reply), "earlier" (an older one: an edit, a regenerated reply, an older branch),
    "new chat" (no reply yet, under a reused header key) or "unknown" (replies it does not keep),
    and the user turns to read again first (edited in place)."""
    if not conversation.snapshots:   # new, or nothing kept yet: its state is the empty one already
        return "", []
    found, again = conversation.continue_from(messages, arrived)
    if found is None:
        return ("unknown" if any(m["role"] == "assistant" for m in messages) else "new chat"), []
    return ("" if found is conversation.snapshots[-1] or found["key"] == LEGACY_SNAPSHOT else "earlier"), again


def resume_by_key(service: Service, workflow: Workflow, messages: Sequence[dict], chat_key: str,
                  held: HeldLock) -> Tuple[Conversation, bool]:
    """Conversations keyed by a header (Open WebUI's chat id) instead of the id block.
    The key is hashed with the model's name: a model switch is a new conversation."""
    conversation_id = keyed_conversation_id(workflow, chat_key)
    held.enter_context(service.store.lock(conversation_id))
    record = service.store.load(conversation_id)
    if record is not None and record.get("model") == workflow.name:
        return Conversation.from_record(record), False
    return Conversation(conversation_id, workflow.name), any(m["role"] == "assistant" for m in messages)


def keyed_conversation_id(workflow: Workflow, chat_key: str) -> str:
    """The conversation a header key names for this model: the key hashed with the model's name."""
    digest = hashlib.sha256(f"{workflow.name}\0{chat_key}".encode()).digest()
    return base64.urlsafe_b64encode(digest).decode()[:32]


def resume_by_id_block(service: Service, workflow: Workflow, messages: Sequence[dict],
                       held: HeldLock, hints: Sequence[str] = ()) -> Tuple[Conversation, bool]:
    """The conversation named by the newest id block of this model (or else by ``hints``, the
    conversations the ids of the history's replies name), locked for this turn, and whether it
    must be recovered from the whole history (an id this store does not know)."""
    store = service.store
    replied = False   # a loop, not any() over a generator: every new chat's first turn comes here
    for message in messages:
        if message["role"] == "assistant":
            replied = True
            break
    if not replied and not hints:   # a new chat's first turn: no id to look for, a new conversation
        return _new_conversation(service, workflow, held), False
    ids = find_conversation_ids(messages) if replied else []   # ids are only looked for in replies
    if hints:   # Responses only: most turns have none, and an empty comprehension is still a call
        ids += [hint for hint in hints if hint not in ids and is_conversation_id(hint)]
    switched = False
    for conversation_id in ids:   # newest first: after A → B → A, the chat resumes A
        held.enter_context(store.lock(conversation_id))
        record = store.load(conversation_id)
        if record is not None and record.get("model") == workflow.name:
            return Conversation.from_record(record), False
        held.release()
        switched = switched or record is not None
    if switched:   # only other workflows' conversations: never reuse their values,
        return _new_conversation(service, workflow, held), False   # nor the messages sent to them
    if ids:   # only ids this store does not know (wiped, or another server): keep the newest
        held.enter_context(store.lock(ids[0]))
        record = store.load(ids[0])   # a concurrent turn may have just made it
        if record is not None and record.get("model") == workflow.name:
            return Conversation.from_record(record), False
        return Conversation(ids[0], workflow.name), True
    return _new_conversation(service, workflow, held), replied   # replies, and no id of ours: recovered


def _new_conversation(service: Service, workflow: Workflow, held: HeldLock) -> Conversation:
    conversation = Conversation(service.new_conversation_id(), workflow.name)   # positional: quicker
    conversation.is_new = True
    held.enter_context(service.store.lock(conversation.id))
    return conversation


####################################################################################
# Serving a turn over HTTP: streams, keep-alives, keys
####################################################################################

def estimate_tokens(text: str) -> int:
    return tokens_of_chars(len(text))


def tokens_of_chars(count: int) -> int:
    """The tokens estimate_tokens counts for a text of ``count`` characters."""
    return (count + CHARS_PER_TOKEN - 1) // CHARS_PER_TOKEN


class LogLineFormatter(logging.Formatter):
    """The lines ``logging.Formatter("%(asctime)s %(levelname)s %(message)s")`` writes, to the
    character, written with fewer steps: the server logs a line per request, and the standard
    formatter's time and style machinery cost a turn some 20,000 instructions. The time's text
    is made once a second; a record with a traceback or a stack is left to the standard code."""

    def __init__(self) -> None:
        super().__init__(LOG_FORMAT)
        self._second: Tuple[int, str] = (-1, "")   # the last second written, with its text: one tuple, so
        # a thread reads a second and a text that belong together

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info or record.exc_text or record.stack_info:
            return super().format(record)
        second, text = self._second
        if int(record.created) != second:
            second = int(record.created)
            text = time.strftime(self.default_time_format, self.converter(record.created))
            self._second = (second, text)
        record.message = record.getMessage()   # as the standard format leaves them, for a handler after us
        record.asctime = f"{text},{int(record.msecs):03d}"
        return f"{record.asctime} {record.levelname} {record.message}"


class _LineStreamHandler(logging.StreamHandler):
    """A StreamHandler that writes each line outside its lock where the stream keeps nothing
    back, so that the line is in the file when the write returns: stderr is line-buffered on a
    terminal, and writes straight through to its file when it is a file, a pipe or a journal.
    The standard handler writes under its lock, and a write lets the interpreter lock go: under
    load, the other request threads then queued on the handler's lock, each waking the next
    (writing outside it gave the served turn about 8% more turns a second, paired runs with a
    fixed hash seed). The bytes are the stream's own, as StreamHandler's are (its encoder, its
    byte-order mark once, its line endings); a line is one write to the file (a pipe keeps
    writes under 4 KiB whole, a file's writes do not overlap), so threads' lines never mix.
    Another stream (a StringIO, a buffered file opened by the host) is written as
    StreamHandler writes it, under the lock."""

    def _writes_whole_lines(self) -> bool:
        """Whether each line reaches the stream's file as it is written, nothing kept back: a
        line-buffered stream, or one writing through to an unbuffered file; lines end in a newline."""
        stream = self.stream
        return self.terminator == "\n" and (getattr(stream, "line_buffering", False) or (
            getattr(stream, "write_through", False) and isinstance(getattr(stream, "buffer", None), io.RawIOBase)))

    def handle(self, record: logging.LogRecord) -> bool:
        if not self._writes_whole_lines():
            return super().handle(record)
        if not self.filter(record):
            return False
        try:
            self.stream.write(self.format(record) + "\n")
        except RecursionError:   # as StreamHandler.emit: a logging loop is not swallowed
            raise
        except Exception:
            self.handleError(record)
        return True

    def flush(self) -> None:
        if not self._writes_whole_lines():
            super().flush()   # otherwise each line is out already


def log_line_handler(stream: Optional[TextIO] = None) -> logging.Handler:
    """The handler `python cozyopenai.py` logs with: a line per record (LogLineFormatter) on
    ``stream``, stderr by default."""
    handler = _LineStreamHandler(stream)
    handler.setFormatter(LogLineFormatter())
    return handler


def _log_line(method: str, path: str, status: int, trace: Mapping[str, str], started: float) -> None:
    if not log.isEnabledFor(logging.INFO):
        return
    # The record log.info would make, made here: log.info would walk the stack to find this
    # function (findCaller) on every request, for fields the log line does not show.
    frame = sys._getframe()
    try:
        log.handle(log.makeRecord(log.name, logging.INFO, frame.f_code.co_filename, frame.f_lineno,
                                  "%s %s model=%s conversation=%s status=%d %.0f ms",
                                  (method, path, trace.get("model", "-"), trace.get("conversation", "-"), status,
                                   (time.monotonic() - started) * 1000), None, "_log_line"))
    finally:   # a frame kept in its own locals is a cycle: the request's frames, and all they hold, would
        del frame   # wait for the garbage collector


def _logged_when_done(stream: Iterator[bytes], method: str, path: str, trace: Mapping[str, str],
                      started: float) -> Iterator[bytes]:
    try:
        yield from stream
    finally:
        _log_line(method, path, 200, trace, started)


def stream_headers() -> None:
    bottle.response.content_type = "text/event-stream; charset=utf-8"
    bottle.response.set_header("Cache-Control", "no-cache")
    bottle.response.set_header("X-Accel-Buffering", "no")   # nginx: do not buffer the stream


def counted_stream(stream: Iterator[bytes], metrics: Any) -> Iterator[bytes]:
    metrics.add("open_streams")
    try:
        yield from stream
    finally:
        metrics.add("open_streams", -1)


class StreamEnding:
    """What an open stream ends with when the server cuts it short (a shutdown past its grace
    period): the built-in server puts one in each request's environ, a streamed route sets
    ``end`` (a message in, the protocol's last events out), and the server writes them
    between two of the stream's own writes."""

    def __init__(self) -> None:
        self.end: Optional[Callable[[str], bytes]] = None


def stream_ending(end: Callable[[str], bytes]) -> None:
    """Say how this request's stream ends if it is cut short (a no-op on servers without it)."""
    ending = bottle.request.environ.get(ENDING_ENVIRON_KEY)
    if isinstance(ending, StreamEnding):
        ending.end = end


class StreamedTurn:
    """A streamed reply's body that owns its turn. The WSGI server calls ``close()`` once the
    reply ends, whether it was sent whole or the client left (PEP 3333); that closes the body,
    then the turn, which saves and unlocks. A body read to its end closes itself, for servers
    that never call close on an empty reply. ``ending(message, events sent)`` gives the bytes
    that end it if the server cuts it short. It is in the open-streams gauge (as MCP's streams,
    counted_stream) from its first piece until it closes, and ``when_closed`` is called after:
    done here, not by generators around it, which would each be resumed for every piece."""

    def __init__(self, body: Iterator[bytes], turn: Union[Turn, AnsweredTurn], metrics: Any,
                 ending: Optional[Callable[[str, int], bytes]] = None):
        self._body, self._turn, self._metrics = body, turn, metrics
        self.events_sent = 0   # SSE events, not comments: the Responses API numbers its events
        self._open = True
        self._counted = False   # in the open-streams gauge
        self._when_closed: Optional[Callable[[], None]] = None
        if ending is not None:
            stream_ending(lambda message: ending(message, self.events_sent))

    def when_closed(self, then: Callable[[], None]) -> None:
        """Call ``then`` once the reply is over, its turn closed (the route's log line)."""
        self._when_closed = then

    def __iter__(self) -> "StreamedTurn":
        return self

    def __next__(self) -> bytes:
        if not self._counted and self._open:
            self._counted = True
            self._metrics.add("open_streams")
        try:
            data = next(self._body)
        except BaseException:   # the end, or a failure: either way the turn is over
            self.close()
            raise
        if not data.startswith(b":"):
            self.events_sent += 1
        return data

    def close(self) -> None:
        if not self._open:
            return
        self._open = False
        try:
            try:
                self._body.close()
            finally:
                if self._counted:
                    self._metrics.add("open_streams", -1)
            self._turn.close()
        except CozyError as exc:   # the store went away while the reply streamed: too late for a 503
            log.error("a streamed turn could not be saved: %s", exc.message)
        finally:
            if self._when_closed is not None:
                self._when_closed()


def check_key(api_keys: Sequence[str], authorization: str) -> None:
    """With API keys set, the request must carry one of them as a Bearer token."""
    if not api_keys:
        return
    given = authorization[7:].strip() if authorization.lower().startswith("bearer ") else ""
    if not any([hmac.compare_digest(given.encode(), key.encode()) for key in api_keys]):  # all compared
        raise UnauthorizedError("Missing or wrong API key: send 'Authorization: Bearer <key>'.")


def check_origin(origins: Sequence[str], environ: Mapping[str, Any]) -> None:
    """A browser's Origin must be this machine's (loopback) or one given with --cors-origin:
    without it any page the user opens could drive the workflows (a form or a text/plain
    POST needs no preflight), and DNS rebinding makes "the same as Host" no test at all.
    ``environ`` is the request's (bottle.request.environ)."""
    if "HTTP_ORIGIN" not in environ:   # not a browser: nothing to check (the common case)
        return
    origin = environ["HTTP_ORIGIN"]
    if origin and origin not in origins and "*" not in origins:
        if (urlsplit(origin).hostname or "") not in ("localhost", "127.0.0.1", "::1"):
            raise ForbiddenOriginError(f"Origin {origin!r} is not allowed here; give it with --cors-origin.")


def read_body(environ: Mapping[str, Any]) -> bytes:
    """The body of the request of ``environ`` (bottle.request.environ), read under our own
    limit (Bottle's MEMFILE_MAX is a global and 100 KB). The framing was checked at the edge
    (check_framing); a chunked body comes decoded by the server. A body shorter than its
    Content-Length is a 400; one that stops arriving (the built-in server's --body-timeout) a 408."""
    stream, length = environ["wsgi.input"], int(environ.get("CONTENT_LENGTH") or -1)   # bottle's content_length
    try:
        if length > MAX_BODY_BYTES:
            raise BodyTooLargeError(f"The request body is over the limit of {MAX_BODY_BYTES} bytes.")
        if "HTTP_TRANSFER_ENCODING" in environ and length < 0:   # chunked: read to its end
            body = stream.read(MAX_BODY_BYTES + 1)
        else:
            body = stream.read(length) if length > 0 else b""
    except (TimeoutError, socket.timeout):
        raise RequestTimeoutError("The request body stopped arriving; the connection is closed.") from None
    except ValueError as exc:   # the server's chunk decoder: a malformed chunked body
        raise RequestError(f"The chunked request body is malformed ({exc}).") from None
    except OSError:
        raise RequestError("The connection failed while the request body was read.") from None
    if len(body) > MAX_BODY_BYTES:
        raise BodyTooLargeError(f"The request body is over the limit of {MAX_BODY_BYTES} bytes.")
    if len(body) < length:
        raise RequestError(f"The request body ended after {len(body)} of the {length} bytes its Content-Length "
                           "announced.")
    return body


def _error_response(error: CozyError) -> str:
    bottle.response.status = error.status
    bottle.response.content_type = "application/json"
    return json.dumps(error.to_openai())


####################################################################################
# Chat Completions
####################################################################################

# Open WebUI sends its background tasks (chat title, tags, follow-up suggestions) to the
# same model, as one user message starting "### Task:" that quotes the chat, our id block
# included. They are answered in the JSON shape they ask for and never touch a
# conversation.
CLIENT_TASK_PREFIX = "### Task:"
CLIENT_TASK_KEY_PATTERN = re.compile(r'JSON format:\s*\{\s*"(\w+)"')


def is_client_task(messages: Sequence[dict]) -> bool:
    last = messages[-1]
    return last["role"] == "user" and last["content"].lstrip().startswith(CLIENT_TASK_PREFIX)


def answer_client_task(workflow: Workflow, task: str, llm: Optional[LLMClient],
                       conversation: Optional[Conversation] = None) -> str:
    """The task's JSON answer. Follow-up suggestions and tags are built from the workflow and
    ``conversation`` (the chat the task is about, when known): suggestions in the user's language
    through the LLM, checked; tags the workflow's name and the values the user gave. Anything
    else from the LLM when there is one, checked, else from the workflow's name and the user's first message."""
    match = CLIENT_TASK_KEY_PATTERN.search(task)
    key = match.group(1) if match else "text"
    said = [line.split(":", 1)[1] for line in task.splitlines() if line.upper().startswith("USER:")]
    if key == "follow_ups":
        offline = follow_ups_offline(workflow, conversation)
        language = users_language(said)
        if llm is not None and offline and language not in (None, "English"):
            try:
                return json.dumps({key: follow_ups_with_llm(llm, workflow, offline, language)}, ensure_ascii=False)
            except UpstreamError as exc:
                log.info("follow-up suggestions offered in English: %s", exc.message)
        return json.dumps({key: offline}, ensure_ascii=False)
    if key == "tags":
        return json.dumps({key: task_tags(workflow, conversation)}, ensure_ascii=False)
    if llm is not None:
        try:
            answer = first_json_object(llm.complete([{"role": "user", "content": task}], temperature=0,
                                                    max_tokens=CLIENT_TASK_MAX_TOKENS))
            why = _task_answer_problem(workflow, key, answer.get(key), task)
            if why is None:
                return json.dumps({key: answer[key]}, ensure_ascii=False)
            log.info("background task %r answered offline: the language model's answer %s", key, why)
        except UpstreamError as exc:
            log.info("background task answered offline: %s", exc.message)
    return json.dumps({key: _offline_task_value(workflow, key, task)}, ensure_ascii=False)


def _task_answer_problem(workflow: Workflow, key: str, value: Any, task: str) -> Optional[str]:
    """Why the LLM's answer to a background task is not of the asked shape (a title is one short
    line, tags and follow-ups a list of short texts) or fails the checks of any text it writes
    for the user; None when it can be shown."""
    said = [line.split(":", 1)[1] for line in task.splitlines() if line.upper().startswith("USER:")] or [task]
    if key == "title":
        if not isinstance(value, str) or "\n" in value.strip():
            return "is not one line of text"
        why = check_llm_text(value, workflow, [task], users_language(said), asks=False, max_chars=TITLE_MAX_CHARS,
                             names=False)
        return f"has a title that cannot be shown: {why}" if why else None
    if key in ("tags", "follow_ups", "queries"):
        if not isinstance(value, list) or not all(isinstance(item, str) and item.strip() for item in value):
            return "is not a list of texts"
        for item in value:
            why = check_llm_text(item, workflow, [task], users_language(said) if key == "follow_ups" else None,
                                 asks=False, max_chars=SUGGESTION_MAX_CHARS)
            if why:
                return f"holds {item[:40]!r}, which cannot be shown: {why}"
        return None
    return None if value is not None else "has no such key"


def task_tags(workflow: Workflow, conversation: Optional[Conversation]) -> List[str]:
    """A chat's tags: the workflow's name, then the short text values the user gave (a place, a choice)."""
    tags = [workflow.name.replace("-", " ").replace("_", " ").capitalize()]
    for name, value in (conversation.values if conversation is not None else {}).items():
        query = workflow.query_inputs.get(name)
        if query is not None and isinstance(value, str) and query.type != "date" and len(value.split()) <= 3:
            tags.append(value)
    return list(dict.fromkeys(tags))


def conversation_of_task(service: Service, workflow: Workflow, task: str, chat_key: str) -> Optional[Conversation]:
    """The chat a background task is about, as its newest turn left it, read without a lock (a
    task changes nothing): by the conversation header, or by the identifier block the task quotes."""
    ids = [keyed_conversation_id(workflow, chat_key)] if chat_key else [
        found for found in reversed(ID_BLOCK_PATTERN.findall(task)) if is_conversation_id(found)]
    for conversation_id in ids[:1]:
        with contextlib.suppress(CozyError, ValueError, OSError):
            record = service.store.load(conversation_id)
            if record is not None and record.get("model") == workflow.name:
                conversation = Conversation.from_record(record)
                if conversation.snapshots:
                    conversation.restore(conversation.snapshots[-1])
                return conversation
    return None


def _offline_task_value(workflow: Workflow, key: str, task: str) -> Any:
    if key == "title":
        first = re.search(r"^USER:\s*(.+)$", task, re.M)
        words = clean_reply(first.group(1)).split() if first else []
        name = workflow.name.replace("-", " ").replace("_", " ").capitalize()
        return f"{name}: {' '.join(words[:8]).rstrip('.!?')}" if words else name
    if key == "tags":
        return [workflow.name]
    return [] if key in ("follow_ups", "queries") else ""


class ChatRequest(NamedTuple):   # one per request: a tuple is quicker to make than a frozen dataclass
    model: str
    messages: List[dict]      # {"role", "content"} with content as text
    stream: bool
    include_usage: bool
    prompt_tokens: int        # the estimate for all the messages' text (estimate_tokens)


# Made as the plain tuple it is: ChatRequest(...) would be a Python call (its constructor). The same ChatRequest.
new_chat_request = partial(tuple.__new__, ChatRequest)


MESSAGE_ROLES = ("system", "developer", "user", "assistant", "tool", "function")


def _json_body(body: bytes, content_type: str) -> dict:
    """The request body as a JSON object, or the OpenAI error that says why not."""
    media_type = "application/json" if content_type == "application/json" else (   # most often: nothing to split
        content_type.split(";")[0].strip().lower())
    if media_type and media_type not in ("application/json", "text/plain") and not media_type.endswith("+json"):
        raise UnsupportedMediaTypeError(f"Send the body as JSON with 'Content-Type: application/json', "
                                        f"not {media_type!r}.")
    try:
        text = body.decode("utf-8")
        data = json_document(text)
        if "\\u" in text and SURROGATE_ESCAPE.search(text):   # no escape at all, most often: no search
            data = with_valid_text(data)
    except (UnicodeDecodeError, ValueError):
        raise RequestError("The request body is not valid JSON.") from None
    except RecursionError:   # a thousand nested brackets: refused, not a 500
        raise RequestError("The request body is nested too deeply.") from None
    if not isinstance(data, dict):
        raise RequestError("The request body must be a JSON object.")
    return data


# A "\ud800" to "\udfff" escape: the one way a lone surrogate, which UTF-8 cannot write,
# gets into a body read as UTF-8 (a pair of them is one character, and valid).
SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def with_valid_text(value: Any) -> Any:
    """A JSON value with every string in it, keys too, made valid_text: a lone surrogate in any
    field (metadata, instructions, a tool's arguments) would fail the save and the reply."""
    if isinstance(value, str):
        return valid_text(value)
    if isinstance(value, list):
        return [with_valid_text(item) for item in value]
    if isinstance(value, dict):
        return {valid_text(key): with_valid_text(item) for key, item in value.items()}
    return value


JSON_TYPE_NAMES = {str: "a string", bool: "true or false", dict: "an object", list: "an array"}


def _field_of(data: Mapping[str, Any], name: str, expected: type) -> Any:
    """A body field of one JSON type (None when null or left out); a 400 naming both types otherwise."""
    value = data.get(name)
    if value is not None and not isinstance(value, expected):
        raise RequestError(f"'{name}' must be {JSON_TYPE_NAMES[expected]}, not {_json_type(value)}.", param=name)
    return value


def _model_of(data: Mapping[str, Any]) -> str:
    model = data.get("model")
    if model is None or model == "":
        raise RequestError("'model' is required: the name of a workflow (see GET /openai/models).", param="model")
    if not isinstance(model, str):
        raise RequestError(f"'model' must be a string, the name of a workflow (see GET /openai/models), not "
                           f"{_json_type(model)}.", param="model")
    return model


def parse_chat_request(body: bytes, content_type: str = "") -> ChatRequest:
    """Validate a chat-completions body; unknown fields are ignored, as OpenAI clients send many."""
    data = _json_body(body, content_type)
    model = data.get("model")
    if model.__class__ is not str or not model:   # a name, most often: the checks and their errors for the others
        model = _model_of(data)
    raw_messages = data.get("messages")
    if not isinstance(raw_messages, list) or not raw_messages:
        raise RequestError("'messages' must be a non-empty array of {role, content} objects, not "
                           f"{'an empty array' if raw_messages == [] else _json_type(raw_messages)}.", param="messages")
    # One loop for the messages, whether one has role "user" and their characters: each
    # comprehension (or any() over a generator) would be a function made and called per request.
    # The index, for an error, is the count of messages parsed so far: no enumerate.
    messages, has_user, characters = [], False, 0
    for message in raw_messages:
        parsed = _parse_message(message, len(messages))
        messages.append(parsed)
        has_user = has_user or parsed["role"] == "user"
        characters += len(parsed["content"])
    if not has_user:
        raise RequestError("'messages' needs at least one message with role 'user'.", param="messages")
    stream = data.get("stream", False)
    if stream.__class__ is not bool:   # null is False; anything else a 400 that names its type
        stream = bool(_field_of(data, "stream", bool))
    choices = data.get("n", 1)   # the body's JSON: an int is of class int, true and false of bool
    if choices is not None and (choices.__class__ is not int or choices != 1):
        raise RequestError("'n' must be 1: a workflow gives one answer per turn.", param="n")
    options = (_field_of(data, "stream_options", dict) or {}) if "stream_options" in data else {}
    return new_chat_request((model, messages, stream, stream and options.get("include_usage") is True,
                             tokens_of_chars(characters)))   # estimate_tokens of the messages' texts joined


def _parse_message(message: Any, index: int) -> dict:
    where = "messages[%d]"   # % index: written only for an error (or parts), not for every message
    if message.__class__ is not dict:   # JSON's: an object is a dict
        raise RequestError(f"{where % index} must be an object with 'role' and 'content', not "
                           f"{_json_type(message)}.", param=where % index)
    role = message.get("role")
    if role not in MESSAGE_ROLES:
        raise RequestError(f"{where % index}.role must be one of {', '.join(MESSAGE_ROLES)}.",
                           param=f"{where % index}.role")
    content = message.get("content")
    if content is None and role in ("assistant", "tool", "function"):
        content = ""
    if isinstance(content, list):
        content = _text_of_parts(content, where % index)
    if not isinstance(content, str):
        raise RequestError(f"{where % index}.content must be a string or an array of text parts, not "
                           f"{_json_type(content)}.", param=f"{where % index}.content")
    # ASCII text holds no lone surrogate: valid_text as it is, without the call and its encoding.
    return {"role": role, "content": content if content.isascii() else valid_text(content)}


def _text_of_parts(parts: List[Any], where: str, kinds: Sequence[str] = ("text", "input_text")) -> str:
    texts = []
    for part in parts:
        if not isinstance(part, dict):
            raise RequestError(f"{where}.content: a part must be an object with 'type' and 'text', not "
                               f"{_json_type(part)}.", param=f"{where}.content")
        if part.get("type") not in kinds:
            kind = part.get("type")
            shown = (repr(kind) if isinstance(kind, str) else "a part with no 'type'" if kind is None
                     else f"a part whose 'type' is {_json_type(kind)}")
            raise RequestError(f"{where}.content: only text parts are supported, not {shown}; "
                               "workflows take their inputs as text.", param=f"{where}.content")
        if not isinstance(part.get("text"), str):
            raise RequestError(f"{where}.content: a text part needs a 'text' string, not "
                               f"{_json_type(part.get('text'))}.", param=f"{where}.content")
        texts.append(part["text"])
    return "\n".join(texts)


THINKING_STYLES = ("tags", "reasoning_content")


def reply_fields(pieces: Iterator[Optional[Piece]], thinking: str = "tags") -> Iterator[Optional[Tuple[str, str]]]:
    """Chat Completions: the pieces as (field, text). With thinking "tags", everything goes to
    ``content`` and the thinking sits in one <thinking> block, closed before the answer; with
    "reasoning_content", thinking goes to that field (for clients that show reasoning from
    it) and the answer to ``content``."""
    tags, thinking_open = thinking == "tags", False
    for piece in pieces:
        if piece is None:   # a keep-alive
            yield None
            continue
        channel, text = piece
        if channel == "thinking":
            if tags and not thinking_open:
                yield "content", "<thinking>\n"
            thinking_open = True
            yield ("content" if tags else "reasoning_content"), text
        else:
            if tags and thinking_open:
                yield "content", "</thinking>\n\n"
            thinking_open = False
            yield "content", text
    if tags and thinking_open:
        yield "content", "</thinking>\n\n"


def whole_reply(pieces: Iterable[Piece], thinking: str = "tags") -> Dict[str, Optional[str]]:
    """A reply sent whole: the text reply_fields gives each field, joined, with no generator
    step per piece; ``reasoning_content`` is None when no piece went there."""
    if thinking != "tags":
        texts: Dict[str, List[str]] = {"content": [], "reasoning_content": []}
        for channel, text in pieces:
            texts["reasoning_content" if channel == "thinking" else "content"].append(text)
        reasoning = "".join(texts["reasoning_content"]) if texts["reasoning_content"] else None
        return {"content": "".join(texts["content"]), "reasoning_content": reasoning}
    content, thinking_open = [], False
    for channel, text in pieces:
        if (channel == "thinking") is not thinking_open:   # the <thinking> block opens or closes (both bools)
            content.append("</thinking>\n\n" if thinking_open else "<thinking>\n")
            thinking_open = not thinking_open
        content.append(text)
    if thinking_open:
        content.append("</thinking>\n\n")
    return {"content": "".join(content), "reasoning_content": None}


def new_completion_id() -> str:
    """Completion ids need to be unique, not secret: no system call for them (one per reply costs under load)."""
    return "chatcmpl-" + random.getrandbits(96).to_bytes(12, "big").hex()   # f"{n:024x}", for half the work


def completion_chunks(fields: Iterator[Optional[Tuple[str, str]]], request: ChatRequest,
                      prompt_tokens: int) -> Iterator[bytes]:
    """Server-sent events of chat.completion.chunk objects, then ``data: [DONE]``.
    A None in ``fields`` becomes an SSE comment, which keeps idle proxies from closing."""
    completion_id, created = new_completion_id(), int(time.time())
    # Each chunk is json_text's text of its object, written out as completion_text is (the test
    # test_streamed_chunks_are_the_json_of_their_objects holds it to that): the chunks differ only
    # in their delta and finish_reason, so the bytes around the delta are written once.
    before = (f'data: {{"id": "{completion_id}", "object": "chat.completion.chunk", "created": {created}, '
              f'"model": {json_string(request.model)}, "system_fingerprint": null, "choices": [{{"index": 0, '
              f'"delta": ').encode()
    usage_item = ', "usage": null' if request.include_usage else ""
    tail = ', "logprobs": null, "finish_reason": %s}]' + usage_item + '}\n\n'   # after the delta
    after = (tail % "null").encode()
    yield before + b'{"role": "assistant", "content": ""}' + after
    # Every chunk's bytes up to its text, by field (json_text({field: text}) written out): the
    # names reply_fields gives, written once, not escaped in every chunk.
    openings = {"content": before + b'{"content": ', "reasoning_content": before + b'{"reasoning_content": '}
    closing = b"}" + after
    completion_chars = 0
    for item in fields:
        if item is None:
            yield b": keep-alive\n\n"
        elif item[1]:
            field_name, text = item
            completion_chars += len(text)
            opening = openings.get(field_name) or before + f"{{{json_string(field_name)}: ".encode()
            yield opening + json_string(text).encode() + closing
    yield before + b"{}" + (tail % '"stop"').encode()
    if request.include_usage:
        usage = _usage(prompt_tokens, completion_chars)
        body = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                "model": request.model, "system_fingerprint": None, "choices": [], "usage": usage}
        yield b"data: " + json.dumps(body).encode() + b"\n\n"
    yield b"data: [DONE]\n\n"


def completion_cut(message: str) -> bytes:
    """The end of a stream the server cuts short: an error chunk (the openai client raises
    it) and ``[DONE]``; a finished stream's last chunk has ``finish_reason`` instead."""
    error = ServerBusyError(message, code="server_shutting_down").to_openai()
    return b"data: " + json.dumps(error).encode() + b"\n\ndata: [DONE]\n\n"


def completion_body(texts: Mapping[str, Optional[str]], request: ChatRequest, prompt_tokens: int) -> bytes:
    """The chat.completion object of a whole reply, from its texts (whole_reply), as the UTF-8 of
    the JSON text json_text would write for it, written out: the encoder costs some 1,500
    instructions an item of an object, and an object of two dozen items was most of the reply's
    cost at the edge. Only its strings from outside need json_string; the test that it is
    json_text's, to the byte, whatever the texts, is test_a_whole_reply_is_the_json_of_its_completion_object.
    Encoded in three parts: the ASCII around the content is copied as it is, where one text
    holding the content (wide with any non-ASCII character) would be encoded character by character:
    the texts are encoded on their own, and written into COMPLETION_BODY with the numbers."""
    content, reasoning = texts["content"], texts["reasoning_content"]
    completion_tokens = tokens_of_chars(len(content) if reasoning is None else len(content) + len(reasoning))
    reasoning_item = b"" if reasoning is None else b', "reasoning_content": ' + json_string(reasoning).encode()
    return COMPLETION_BODY % (new_completion_id().encode(), int(time.time()), json_string(request.model).encode(),
                              json_string(content).encode(), reasoning_item,
                              prompt_tokens, completion_tokens, prompt_tokens + completion_tokens)   # as _usage


# completion_body's bytes, its values left out: one formatting writes them all in (the id is hex).
COMPLETION_BODY = (b'{"id": "%s", "object": "chat.completion", "created": %d, "model": %s, "system_fingerprint": null, '
                   b'"choices": [{"index": 0, "message": {"role": "assistant", "content": %s, "refusal": null%s}, '
                   b'"logprobs": null, "finish_reason": "stop"}], "usage": {"prompt_tokens": %d, '
                   b'"completion_tokens": %d, "total_tokens": %d}}')


def completion_text(texts: Mapping[str, Optional[str]], request: ChatRequest, prompt_tokens: int) -> str:
    """completion_body's JSON, as text."""
    return completion_body(texts, request, prompt_tokens).decode()


def _usage(prompt_tokens: int, completion_chars: int) -> dict:
    completion_tokens = tokens_of_chars(completion_chars)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def model_object(workflow: Workflow) -> dict:
    return {"id": workflow.name, "object": "model", "created": workflow.created, "owned_by": MODEL_OWNER}


def chat_completions(service: Service, environ: Dict[str, Any]) -> Any:
    """POST /openai/chat/completions: one turn, streamed as chunks or answered whole.
    ``environ`` is the request's, as its route read it (bottle.request.environ)."""
    request = parse_chat_request(read_body(environ), environ.get("CONTENT_TYPE", ""))
    prompt_tokens = request.prompt_tokens
    chat_key = bottle.request.get_header(service.conversation_header, "") if service.conversation_header else ""
    turn = open_chat_turn(service, TurnRequest(request.model, request.messages, True, chat_key),
                          HangUpAwareEvent(environ.get(CONNECTION_ENVIRON_KEY)), environ.get(TRACE_ENVIRON_KEY))
    if request.stream:
        stream_headers()
        fields = reply_fields(turn.pieces(service.keepalive_seconds), service.thinking)
        return StreamedTurn(completion_chunks(fields, request, prompt_tokens), turn, service.metrics,
                            lambda message, sent: completion_cut(message))
    try:
        body = completion_body(whole_reply(turn.pieces(), service.thinking), request, prompt_tokens)
    finally:
        turn.close()
    bottle.response.set_header("Content-Type", "application/json")   # as _json_route would for an object
    return body


def open_chat_turn(service: Service, request: TurnRequest, stop: threading.Event,
                   trace: Optional[Dict[str, str]]) -> Union[Turn, AnsweredTurn]:
    """The turn, or what a chat client's own requests get without one (both APIs use this)."""
    trace = {} if trace is None else trace
    last = request.messages[-1]
    if last["role"] == "assistant":
        # Open WebUI's "Continue Response" sends the history ending with our reply: the turn
        # is over and nothing was said, so there is nothing to add (and no turn).
        trace.update(model=service.workflow(request.model).name, conversation="continue")
        return AnsweredTurn("")
    # A task's text holds its prefix: most turns' do not, and skip is_client_task's call.
    if CLIENT_TASK_PREFIX in last["content"] and is_client_task(request.messages):
        workflow = service.workflow(request.model)
        trace.update(model=workflow.name, conversation="task")
        task = request.messages[-1]["content"]
        conversation = conversation_of_task(service, workflow, task, request.chat_key)
        return AnsweredTurn(workflow.redact(answer_client_task(workflow, task, service.llm, conversation)))
    return service.open_turn(request, stop, trace)


def list_models(service: Service) -> dict:
    return {"object": "list", "data": [model_object(workflow) for workflow in service.workflows.values()]}


def get_model(service: Service, model_id: str) -> dict:
    return model_object(service.workflow(model_id))


####################################################################################
# The Responses API
####################################################################################

class ResponsesRequest(NamedTuple):   # one per request: a tuple is quicker to make than a frozen dataclass
    model: str
    messages: List[dict]          # the input as chat messages
    stream: bool
    store: bool
    previous_response_id: str
    metadata: Dict[str, Any]
    instructions: Optional[str]
    conversation: str = ""        # the Conversations API's id, as sent ("conv_...")
    items: Tuple[dict, ...] = ()  # the input's message items, references resolved: what input_items lists
    hints: Tuple[str, ...] = ()   # the conversations the ids of the input's replies name, newest first
    truncation: str = "disabled"
    background: bool = False


# Made as the plain tuple it is, every field given in order: ResponsesRequest(...) would be a
# Python call (the NamedTuple's constructor), with keywords. The same ResponsesRequest.
new_responses_request = partial(tuple.__new__, ResponsesRequest)


RESPONSES_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "developer"}
INPUT_TEXT_PARTS = ("input_text", "output_text", "text")
# An item id names its conversation, so a reference is found with one load: "msg_" or "rs_",
# the conversation's id, then a response's or an item's own characters.
ITEM_ID_PATTERN = re.compile(r"\A(?:msg|rs)_([A-Za-z0-9_-]{32})[A-Za-z0-9_]{1,24}\Z")
# The request fields of OpenAI's Responses API that change nothing here, whatever their value:
# who the user is, caching and billing hints, what to include that a workflow has none of.
RESPONSES_IGNORED_FIELDS = ("user", "safety_identifier", "prompt_cache_key", "prompt_cache_retention",
                            "prompt_cache_options", "service_tier", "parallel_tool_calls", "include", "reasoning",
                            "stream_options")
RESPONSES_OWN_FIELDS = ("model", "input", "stream", "store", "previous_response_id", "metadata", "instructions",
                        "conversation", "background", "truncation", "tools", "tool_choice", "text")
# Fields a workflow cannot honour: set to anything but null they are a 400 that says why.
RESPONSES_REFUSED_FIELDS = {
    "max_output_tokens": "a workflow's answer is written by its nodes; an `llm` node has its own max_tokens",
    "temperature": "a workflow's `llm` nodes have their own settings", "top_p": "a workflow's `llm` nodes have "
    "their own settings", "top_logprobs": "no logprobs are produced", "max_tool_calls": "a workflow calls no "
    "client tools", "prompt": "there are no stored prompts; send 'input'", "background_options": "background "
    "runs take no options", "context_management": "a workflow reads only the new message, so it needs none",
    "moderation": "there is no moderation model", "image": "workflows take text", "access_programs":
    "there are no access programs"}
# The fields the field-by-field look lets by (tools, tool_choice and text are looked at after it):
# a body with only these needs no such look.
RESPONSES_PLAIN_FIELDS = frozenset(RESPONSES_IGNORED_FIELDS + RESPONSES_OWN_FIELDS)
# The fields of one JSON type, when given (None is always allowed).
RESPONSES_TYPED_FIELDS = (("stream", bool), ("store", bool), ("previous_response_id", str), ("instructions", str),
                          ("background", bool))


# OpenAI's rule for the metadata of a response and of a conversation alike.
METADATA_MAX_KEYS = 16
METADATA_MAX_KEY_CHARACTERS = 64
METADATA_MAX_VALUE_CHARACTERS = 512


def checked_metadata(metadata: Any) -> Dict[str, str]:
    """``metadata`` as OpenAI takes it (a response's or a conversation's): an object of at
    most 16 keys of up to 64 characters, each to a string of up to 512; a 400 saying which not."""
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise RequestError(f"'metadata' must be an object of keys to strings, not {_json_type(metadata)}.",
                           param="metadata")
    if len(metadata) > METADATA_MAX_KEYS:
        raise RequestError(f"'metadata' can have at most {METADATA_MAX_KEYS} keys, not {len(metadata)}.",
                           param="metadata")
    for key, value in metadata.items():
        if len(key) > METADATA_MAX_KEY_CHARACTERS:
            raise RequestError(f"'metadata' keys can be at most {METADATA_MAX_KEY_CHARACTERS} characters, not "
                               f"{len(key)}.", param="metadata")
        if not isinstance(value, str):
            raise RequestError(f"'metadata.{key}' must be a string, not {_json_type(value)}: metadata values "
                               "are strings.", param=f"metadata.{key}")
        if len(value) > METADATA_MAX_VALUE_CHARACTERS:
            raise RequestError(f"'metadata.{key}' can be at most {METADATA_MAX_VALUE_CHARACTERS} characters, not "
                               f"{len(value)}.", param=f"metadata.{key}")
    return dict(metadata)


def parse_responses_request(body: bytes, content_type: str = "",
                            find_item: Optional[Callable[[str], Optional[dict]]] = None) -> ResponsesRequest:
    """Validate a Responses body. ``input`` is a string or a list of items: messages (content
    a string or text parts) and ``item_reference`` items, which ``find_item`` resolves to the
    stored items they name; other items (reasoning, tool calls) are skipped, as a workflow
    calls no client tools; images and files are refused. A field OpenAI's API has and this
    server does not honour is a 400 that names it, as is one OpenAI's API does not have."""
    data = _json_body(body, content_type)
    _refuse_what_is_not_honoured(data)
    model = data.get("model")
    if model.__class__ is not str or not model:   # a name, most often: the checks and their errors for the others
        model = _model_of(data)
    for name, expected in RESPONSES_TYPED_FIELDS:
        if name in data:   # one left out is None: nothing to check, no call
            _field_of(data, name, expected)
    metadata = checked_metadata(data.get("metadata"))
    conversation = data.get("conversation")
    if isinstance(conversation, dict):
        conversation = conversation.get("id")
    if conversation is not None and not (isinstance(conversation, str) and conversation):
        raise RequestError("'conversation' must be a conversation's id, or an object with its 'id'.",
                           param="conversation")
    if conversation and data.get("previous_response_id"):
        raise RequestError("Mutually exclusive parameters: Ensure you are only providing one of: "
                           "'previous_response_id' or 'conversation'.", param="conversation",
                           code="mutually_exclusive_parameters")
    raw = data.get("input")
    if raw is None and conversation:
        raw = []   # the conversation's own items are the input
    if isinstance(raw, str):
        raw = [{"role": "user", "content": raw}]
    if not isinstance(raw, list) or (not raw and not conversation):
        raise RequestError("'input' must be a string or a non-empty array of messages, not "
                           f"{'an empty array' if raw == [] else _json_type(raw)}.", param="input")
    items = [message for index, item in enumerate(raw) for message in _input_items(item, index, find_item)]
    messages = item_messages(items)
    if not conversation and "user" not in [message["role"] for message in messages]:   # no any() generator
        raise RequestError("'input' needs at least one user message.", param="input")
    hints = []   # a loop: a comprehension over a generator made two functions per request, for no reply most often
    for item in reversed(items):
        match = ITEM_ID_PATTERN.match(item.get("id") or "") if item["role"] == "assistant" else None
        if match:
            hints.append(match.group(1))
    truncation = data.get("truncation") or "disabled"
    if truncation not in ("auto", "disabled"):
        raise RequestError("'truncation' must be 'auto' or 'disabled'.", param="truncation")
    return new_responses_request((model, messages, bool(data.get("stream")),   # model, messages, stream,
                                  data.get("store") is not False,              # store,
                                  data.get("previous_response_id") or "",      # previous_response_id,
                                  metadata, data.get("instructions"),          # metadata, instructions,
                                  conversation or "", tuple(items),            # conversation, items,
                                  tuple(dict.fromkeys(hints)),                 # hints,
                                  truncation, bool(data.get("background"))))   # truncation, background


def _refuse_what_is_not_honoured(data: Mapping[str, Any]) -> None:
    if not data.keys() <= RESPONSES_PLAIN_FIELDS:   # a set comparison in C: most bodies need no look field by field
        for name, value in data.items():
            if name in RESPONSES_REFUSED_FIELDS and value is not None:
                raise RequestError(f"'{name}' is not supported: {RESPONSES_REFUSED_FIELDS[name]}.", param=name,
                                   code="unsupported_parameter")
            if name not in RESPONSES_REFUSED_FIELDS and name not in RESPONSES_PLAIN_FIELDS:
                raise RequestError(f"Unknown parameter: '{name}'.", param=name, code="unknown_parameter")
    tools, choice, text = data.get("tools"), data.get("tool_choice"), data.get("text")
    if tools is not None and tools != []:
        raise RequestError("'tools' is not supported: a workflow calls no client tools; send an empty list.",
                           param="tools", code="unsupported_parameter")
    if choice is not None and choice not in ("auto", "none"):
        raise RequestError("'tool_choice' must be 'auto' or 'none': a workflow calls no client tools.",
                           param="tool_choice", code="unsupported_parameter")
    if text is not None and (not isinstance(text, dict) or
                             (text.get("format") or {"type": "text"}) != {"type": "text"}):
        raise RequestError("'text' is not supported but with the format {\"type\": \"text\"}: a workflow "
                           "answers in text.", param="text", code="unsupported_parameter")


def _input_items(item: Any, index: int, find_item: Optional[Callable[[str], Optional[dict]]],
                 field_name: str = "input") -> List[dict]:
    """One input item as the message items it gives (none, or one)."""
    where = f"{field_name}[{index}]"
    if not isinstance(item, dict):
        raise RequestError(f"{where} must be an object: a message with 'role' and 'content', not {_json_type(item)}.",
                           param=where)
    if item.get("type") == "item_reference":
        if item.get("id") is None or item.get("id") == "":
            raise RequestError(f"Missing required parameter: '{where}.id': an item_reference names the item it "
                               "stands for by its id.", param=f"{where}.id", code="missing_required_parameter")
        if not isinstance(item["id"], str):
            raise RequestError(f"'{where}.id' must be a string, not {_json_type(item['id'])}.", param=f"{where}.id")
        found = find_item(item["id"]) if find_item is not None else None
        if found is None:
            raise RequestError(f"Item with id {item.get('id')!r} not found.", param=where, code="item_not_found")
        return [found] if found.get("type") == "message" else []
    if item.get("type", "message") != "message":
        return []   # reasoning, function calls and their outputs: nothing a workflow reads
    role = RESPONSES_ROLES.get(item.get("role"))
    if role is None:
        raise RequestError(f"{where}.role must be one of {', '.join(RESPONSES_ROLES)}.", param=f"{where}.role")
    content = item.get("content")
    if isinstance(content, list):
        content = _text_of_parts(content, where, INPUT_TEXT_PARTS)
    if not isinstance(content, str):
        raise RequestError(f"{where}.content must be a string or an array of text parts, not {_json_type(content)}.",
                           param=f"{where}.content")
    message = text_item(role, valid_text(content))
    if isinstance(item.get("id"), str):
        message["id"] = item["id"]
    return [message]


def text_item(role: str, text: str) -> dict:
    """A message item of the Responses and Conversations APIs, with one text part."""
    return {"type": "message", "role": role, "status": "completed",
            "content": [{"type": "output_text", "text": text, "annotations": []} if role == "assistant"
                        else {"type": "input_text", "text": text}]}


def find_item(service: Service, item_id: str) -> Optional[dict]:
    """The stored item ``item_id`` names: a response's input or output, or a conversation's item."""
    match = ITEM_ID_PATTERN.match(item_id)
    record = service.store.load(match.group(1)) if match else None
    if record is None:
        return None
    candidates = list((record.get("api") or {}).get("items", []))
    for response_id, response in record.get("responses", {}).items():
        candidates += response_output(response_id, response) + list(response.get("input", []))
    return next((dict(item) for item in candidates if item.get("id") == item_id), None)


def response_object(response_id: str, model: str, stored: Mapping[str, Any], status: str = "completed") -> dict:
    """A ``response`` object: the progress as a reasoning item (clients show it as reasoning,
    not answer), the answer as one message with one output_text part."""
    status = stored.get("status", status)
    output = response_output(response_id, stored, status)
    usage = _response_usage(stored.get("prompt_tokens", 0), stored.get("thinking", ""), stored.get("answer", ""))
    conversation = stored.get("conversation")
    return {"id": response_id, "object": "response", "created_at": stored.get("created_at", int(time.time())),
            "status": status, "model": model, "output": output, "output_text": stored.get("answer", ""),
            "previous_response_id": stored.get("previous_response_id") or None,
            "conversation": {"id": conversation} if conversation else None,
            "background": stored.get("background", False),
            "instructions": stored.get("instructions"), "metadata": stored.get("metadata") or {},
            "store": stored.get("store", True), "error": stored.get("error"), "incomplete_details": None,
            "parallel_tool_calls": False, "tool_choice": "none", "tools": [], "temperature": None, "top_p": None,
            "max_output_tokens": None, "truncation": stored.get("truncation", "disabled"),
            "text": {"format": {"type": "text"}},
            "reasoning": {"effort": None, "summary": None}, "user": None,
            "usage": {"input_tokens": usage.get("input_tokens", 0),
                      "input_tokens_details": {"cached_tokens": 0},
                      "output_tokens": usage.get("output_tokens", 0),
                      "output_tokens_details": {"reasoning_tokens": usage.get("reasoning_tokens", 0)},
                      "total_tokens": usage.get("input_tokens", 0) + usage.get("output_tokens", 0)}}


def response_text(response_id: str, model: str, stored: Mapping[str, Any], status: str = "completed") -> str:
    """json_text(response_object(...)): response_body's JSON, as text."""
    return response_body(response_id, model, stored, status).decode()


def response_body(response_id: str, model: str, stored: Mapping[str, Any], status: str = "completed") -> bytes:
    """The UTF-8 of json_text(response_object(...)), written out as completion_body is, its output
    items too (_output_json): a response object has some fifty items, most of them the same in
    every response, and json_text's encoder costs some 1,500 instructions an item.
    test_a_response_is_the_json_of_its_response_object holds the two to the same text, to the byte.
    Encoded in parts, as completion_body is: the texts of the turn (the output, output_text) on
    their own, so the ASCII of the rest is not widened and encoded character by character."""
    status = stored.get("status", status)
    usage = _response_usage(stored.get("prompt_tokens", 0), stored.get("thinking", ""), stored.get("answer", ""))
    conversation = stored.get("conversation")
    input_tokens, output_tokens = usage.get("input_tokens", 0), usage.get("output_tokens", 0)
    conversation_json = f'{{"id": {_json_of(conversation)}}}' if conversation else "null"
    return (f'{{"id": {json_string(response_id)}, "object": "response", '
            f'"created_at": {_json_of(stored.get("created_at", int(time.time())))}, "status": {json_string(status)}, '
            f'"model": {json_string(model)}, "output": ').encode() + _output_json(response_id, stored, status) + (
            b', "output_text": ') + _json_of(stored.get("answer", "")).encode() + (
            f', "previous_response_id": {_json_of(stored.get("previous_response_id") or None)}, '
            f'"conversation": {conversation_json}, '
            f'"background": {_json_of(stored.get("background", False))}, '
            f'"instructions": {_json_of(stored.get("instructions"))}, '
            f'"metadata": {_json_of(stored.get("metadata") or {})}, "store": {_json_of(stored.get("store", True))}, '
            f'"error": {_json_of(stored.get("error"))}, "incomplete_details": null, "parallel_tool_calls": false, '
            f'"tool_choice": "none", "tools": [], "temperature": null, "top_p": null, "max_output_tokens": null, '
            f'"truncation": {_json_of(stored.get("truncation", "disabled"))}, "text": {{"format": {{"type": "text"}}}}, '
            f'"reasoning": {{"effort": null, "summary": null}}, "user": null, '
            f'"usage": {{"input_tokens": {_json_of(input_tokens)}, "input_tokens_details": {{"cached_tokens": 0}}, '
            f'"output_tokens": {_json_of(output_tokens)}, '
            f'"output_tokens_details": {{"reasoning_tokens": {_json_of(usage.get("reasoning_tokens", 0))}}}, '
            f'"total_tokens": {_json_of(input_tokens + output_tokens)}}}}}').encode()


def _output_json(response_id: str, stored: Mapping[str, Any], status: str) -> bytes:
    """The UTF-8 of json_text(response_output(...)), written out (for response_body, whose test holds it
    to that): each text encoded on its own, so the ASCII around a wide one is copied, not widened."""
    items = []
    if stored.get("thinking"):
        items.append(REASONING_ITEM % (json_string("rs_" + response_id[5:]).encode(),
                                       _json_of(stored["thinking"]).encode()))
    if status == "completed" or stored.get("answer"):
        text = stored.get("answer", "")
        content = b'[{"type": "output_text", "text": %s, "annotations": []}]' % _json_of(text).encode() if (
            status == "completed" or text) else b"[]"
        item_status = status if status in ("completed", "in_progress") else "incomplete"   # as _message_item
        items.append(MESSAGE_ITEM % (json_string("msg_" + response_id[5:]).encode(), item_status.encode(), content))
    return b"[" + b", ".join(items) + b"]"


# _output_json's items, their values left out.
REASONING_ITEM = b'{"type": "reasoning", "id": %s, "summary": [{"type": "summary_text", "text": %s}]}'
MESSAGE_ITEM = b'{"type": "message", "id": %s, "status": "%s", "role": "assistant", "content": %s}'


def _json_of(value: Any) -> str:
    """json_text(value), with no encoder set up for a string, null, a bool, an int or an empty object."""
    if value.__class__ is str:
        return json_string(value)
    if value is None or value is True or value is False:
        return "null" if value is None else "true" if value else "false"
    if value.__class__ is int:
        return int.__repr__(value)   # as the encoder writes it
    return "{}" if value == {} else json_text(value)


def response_output(response_id: str, stored: Mapping[str, Any], status: str = "completed") -> List[dict]:
    """A response's output items: its progress as a reasoning item, its answer as a message."""
    output: List[dict] = []
    if stored.get("thinking"):
        output.append(_reasoning_item(response_id, stored["thinking"]))
    if status == "completed" or stored.get("answer"):
        output.append(_message_item(response_id, stored.get("answer", ""), status))
    return output


def _reasoning_item(response_id: str, text: str) -> dict:
    return {"type": "reasoning", "id": "rs_" + response_id[5:], "summary": [{"type": "summary_text", "text": text}]}


def _message_item(response_id: str, text: str, status: str = "completed") -> dict:
    # An item is in progress, completed or incomplete: the answer of a response cut short is incomplete.
    item_status = status if status in ("completed", "in_progress") else "incomplete"
    return {"type": "message", "id": "msg_" + response_id[5:], "status": item_status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}] if status == "completed" or text
            else []}


def _response_usage(prompt_tokens: int, thinking: str, answer: str) -> dict:
    # estimate_tokens of the texts, from their lengths: no copy of them joined, no call through estimate_tokens.
    return {"input_tokens": prompt_tokens, "output_tokens": tokens_of_chars(len(thinking) + len(answer)),
            "reasoning_tokens": tokens_of_chars(len(thinking))}


def collect_response(pieces: Iterator[Piece], request: ResponsesRequest, response_id: str,
                     prompt_tokens: int) -> bytes:
    """Non-streamed: the whole response object, as the UTF-8 of its JSON text (response_body)."""
    texts: Dict[str, List[str]] = {"thinking": [], "answer": []}
    for channel, text in pieces:
        texts[channel].append(text)
    thinking, answer = "".join(texts["thinking"]), "".join(texts["answer"])
    return response_body(response_id, request.model, _stored_fields(request, thinking, answer, prompt_tokens))


def _stored_fields(request: ResponsesRequest, thinking: str, answer: str, prompt_tokens: int) -> dict:
    return {"thinking": thinking, "answer": answer, "created_at": int(time.time()),
            **_request_fields(request, prompt_tokens)}


def _request_fields(request: ResponsesRequest, prompt_tokens: int) -> dict:
    """What a response keeps of its request: _stored_fields less the texts and the time (a turn's response_extra)."""
    return {"metadata": request.metadata, "previous_response_id": request.previous_response_id,
            "instructions": request.instructions, "store": request.store, "prompt_tokens": prompt_tokens,
            "conversation": request.conversation, "truncation": request.truncation, "background": request.background}


def response_events(pieces: Iterator[Optional[Piece]], request: ResponsesRequest, response_id: str,
                    prompt_tokens: int) -> Iterator[bytes]:
    """Streamed: the events of response_event_objects as server-sent events; a None (the
    turn silent for a while) becomes an SSE comment (keep-alive)."""
    for event in response_event_objects(pieces, request, response_id, prompt_tokens):
        yield b": keep-alive\n\n" if event is None else sse_event(event)


def sse_event(event: Mapping[str, Any]) -> bytes:
    return f"event: {event['type']}\ndata: {json_text(event)}\n\n".encode()


def response_event_objects(pieces: Iterator[Optional[Piece]], request: ResponsesRequest, response_id: str,
                           prompt_tokens: int) -> Iterator[Optional[dict]]:
    """The semantic events in order, each with a rising ``sequence_number`` from 0; the
    progress lines as reasoning summary deltas as they happen, the answer as output_text
    deltas (an `llm` node's tokens as they arrive), then ``response.completed`` with the
    whole response. A None in ``pieces`` comes through as a None."""
    sequence = itertools.count()
    item = {"reasoning": _reasoning_item(response_id, ""), "message": _message_item(response_id, "", "in_progress")}
    texts: Dict[str, List[str]] = {"thinking": [], "answer": []}
    opened: List[str] = []

    def event(event_type: str, **fields: Any) -> dict:
        return {"type": event_type, "sequence_number": next(sequence), **fields}

    def open_item(item_type: str) -> Iterator[bytes]:
        index = len(opened)
        opened.append(item_type)
        shown = dict(item[item_type], summary=[]) if item_type == "reasoning" else item[item_type]
        yield event("response.output_item.added", output_index=index, item=shown)
        if item_type == "reasoning":
            yield event("response.reasoning_summary_part.added", item_id=item[item_type]["id"], output_index=index,
                        summary_index=0, part={"type": "summary_text", "text": ""})
        else:
            yield event("response.content_part.added", item_id=item[item_type]["id"], output_index=index,
                        content_index=0, part={"type": "output_text", "text": "", "annotations": []})

    def close_item(item_type: str) -> Iterator[bytes]:
        index, text = opened.index(item_type), "".join(texts["thinking" if item_type == "reasoning" else "answer"])
        if item_type == "reasoning":
            done = _reasoning_item(response_id, text)
            yield event("response.reasoning_summary_text.done", item_id=done["id"], output_index=index,
                        summary_index=0, text=text)
            yield event("response.reasoning_summary_part.done", item_id=done["id"], output_index=index,
                        summary_index=0, part=done["summary"][0])
        else:
            done = _message_item(response_id, text)
            yield event("response.output_text.done", item_id=done["id"], output_index=index, content_index=0,
                        text=text)
            yield event("response.content_part.done", item_id=done["id"], output_index=index, content_index=0,
                        part=done["content"][0])
        yield event("response.output_item.done", output_index=index, item=done)

    started = response_object(response_id, request.model,
                              {"created_at": int(time.time()), **_request_fields(request, prompt_tokens)}, "in_progress")
    yield event("response.created", response=started)
    yield event("response.in_progress", response=started)
    for piece in pieces:
        if piece is None:
            yield None
            continue
        channel, text = piece
        item_type = "reasoning" if channel == "thinking" else "message"
        if item_type == "reasoning" and "message" in opened and "reasoning" in opened:
            texts["thinking"].append(text)   # the run's record after a streamed answer: in the
            continue                               # completed response, its item being closed
        if item_type not in opened:
            if item_type == "message" and "reasoning" in opened:
                yield from close_item("reasoning")
            yield from open_item(item_type)
        texts[channel].append(text)
        if item_type == "reasoning":
            yield event("response.reasoning_summary_text.delta", item_id=item[item_type]["id"],
                        output_index=opened.index(item_type), summary_index=0, delta=text)
        elif text:
            yield event("response.output_text.delta", item_id=item[item_type]["id"], output_index=opened.index(item_type),
                        content_index=0, delta=text)
    if "reasoning" in opened and "message" not in opened:
        yield from close_item("reasoning")
    if "message" not in opened:
        yield from open_item("message")
    yield from close_item("message")
    thinking, answer = "".join(texts["thinking"]), "".join(texts["answer"])
    yield event("response.completed", response=response_object(
        response_id, request.model, _stored_fields(request, thinking, answer, prompt_tokens)))


def response_cut(response_id: str, model: str, message: str, sequence_number: int) -> bytes:
    """The end of a stream the server cuts short: ``response.failed``, with the error."""
    response = dict(response_object(response_id, model, {}, "failed"),
                    error={"code": "server_error", "message": message})
    body = {"type": "response.failed", "sequence_number": sequence_number, "response": response}
    return f"event: response.failed\ndata: {json.dumps(body, ensure_ascii=False)}\n\n".encode()


def create_response(service: Service, environ: Dict[str, Any], runs: Optional["BackgroundRuns"] = None) -> Any:
    """POST /openai/responses: one turn, streamed as semantic events or answered whole; with
    ``background``, run on without the client (see BackgroundRun). ``environ`` is the
    request's, as its route read it (bottle.request.environ)."""
    request = parse_responses_request(read_body(environ), environ.get("CONTENT_TYPE", ""),   # _json_body lowers it
                                      lambda item_id: find_item(service, item_id))
    turn_request = response_turn_request(request)
    if request.background:
        if not request.store:
            raise RequestError("'background' needs 'store': a background response is kept to be read later.",
                               param="background")
        started = BackgroundRun(service, request, turn_request, runs or BackgroundRuns()).start()
        if not request.stream:
            return started
        stream_headers()
        return counted_stream(background_events(service, started["id"], -1, service.keepalive_seconds),
                              service.metrics)
    opening = service.open_turn if turn_request.conversation else partial(open_chat_turn, service)
    turn = opening(turn_request, HangUpAwareEvent(environ.get(CONNECTION_ENVIRON_KEY)),
                   environ.get(TRACE_ENVIRON_KEY))
    response_id = turn_request.response_id or f"resp_{secrets.token_hex(20)}"   # not stored: an id of its own
    prompt_tokens = turn_request.response_extra["prompt_tokens"]
    if request.stream:
        stream_headers()
        events = response_events(turn.pieces(service.keepalive_seconds), request, response_id, prompt_tokens)
        return StreamedTurn(events, turn, service.metrics,
                            lambda message, sent: response_cut(response_id, request.model, message, sent))
    with turn:
        body = collect_response(turn.pieces(), request, response_id, prompt_tokens)
    bottle.response.set_header("Content-Type", "application/json")   # as _json_route would for an object
    return body


def response_turn_request(request: ResponsesRequest) -> TurnRequest:
    """The turn a Responses request asks for. Its response keeps its input items, and a
    conversation (Conversations API) gets the input and output items of each response."""
    conversation = conversation_key(request.conversation) if request.conversation else ""
    # estimate_tokens of the messages' texts joined, from their lengths: no string joined, no generator
    prompt_tokens = tokens_of_chars(sum([len(message["content"]) for message in request.messages]))
    turn_request = TurnRequest(request.model, request.messages, id_block=not request.store and not conversation,
                               previous_response_id=request.previous_response_id,
                               store_response=request.store or bool(conversation), conversation=conversation,
                               conversation_hints=list(request.hints),
                               response_extra=_request_fields(request, prompt_tokens))

    request_ref = weakref.ref(turn_request)   # the request holds this function: held back, a cycle for the collector

    def saving(kept: Conversation, thinking: str, answer: str) -> None:
        response_id = request_ref().response_id   # type: ignore[union-attr]   (its turn holds it while it saves)
        response = kept.responses.get(response_id)
        if response is None:
            return
        response["input"] = [dict(item, id=f"msg_{response_id[5:]}_{number}") for number, item in
                             enumerate(request.items)]
        if conversation and kept.api is not None:
            kept.api["items"] = kept.api["items"] + response["input"] + response_output(response_id, response)
    turn_request.saving = saving
    return turn_request


def conversation_key(conversation_id: str) -> str:
    """The store's key of a Conversations API id ("conv_" and the key), or a 404."""
    key = str(conversation_id)[5:]
    if not str(conversation_id).startswith("conv_") or not is_conversation_id(key):
        raise NotFoundError(f"Conversation with id {conversation_id!r} not found.", param="conversation")
    return key


# Background responses. The run's turn holds its conversation locked while it runs, so what
# readers see of it (status, events, heartbeat) is a record of its own, under a key drawn
# from the response's id, in the same store: any instance sharing the store can show it,
# stream it from any event, or cancel it; a run whose instance died stops renewing its
# heartbeat, and the first reader after its lease marks it failed.
BACKGROUND_FLUSH_SECONDS = 0.2      # a run writes its new events to the store at most this often
BACKGROUND_HEARTBEAT_SECONDS = 1.0  # ... and at least this often while its turn is silent (its heartbeat)
BACKGROUND_LEASE_SECONDS = 15.0     # a run whose heartbeat is older than this lost its instance: failed
BACKGROUND_POLL_SECONDS = 0.1       # how often a stream of a run looks for its new events
BACKGROUND_CANCEL_SECONDS = 5.0     # how long a cancel waits for the run to stop before it answers
BACKGROUND_DIED = "The server running this response stopped before it finished; create it again."


def background_key(response_id: str) -> str:
    """The store key of a background run's record (a conversation id's form, for every store)."""
    digest = hashlib.sha256(f"background\0{response_id}".encode()).digest()
    return base64.urlsafe_b64encode(digest).decode()[:32]


class BackgroundRuns:
    """The background runs of this process, by response id: a cancel that reaches this
    instance stops its run at once; one on another instance sees the cancel in the store at
    its next heartbeat."""

    def __init__(self) -> None:
        self._runs: Dict[str, "BackgroundRun"] = {}
        self._guard = threading.Lock()

    def add(self, run: "BackgroundRun") -> None:
        with self._guard:
            self._runs[run.response_id] = run

    def discard(self, run: "BackgroundRun") -> None:
        with self._guard:
            self._runs.pop(run.response_id, None)

    def cancel(self, response_id: str) -> None:
        with self._guard:
            run = self._runs.get(response_id)
        if run is not None:
            run.cancel()


class BackgroundRun:
    """One background response, on a thread of its own: the thread opens the turn (so its
    conversation is locked and freed on one thread, as the Store's rule asks), plays it to
    the end with no client, and writes the events, the status and a heartbeat to the run's
    record. ``start()`` gives the response as it begins, or raises what a foreground
    request would have answered (an unknown model or previous response, a store that is down)."""

    def __init__(self, service: Service, request: ResponsesRequest, turn_request: TurnRequest, runs: BackgroundRuns):
        self.service, self.request, self.turn_request, self.runs = service, request, turn_request, runs
        self.response_id, self.key = "", ""
        self._stop, self._cancelled, self._opened = threading.Event(), threading.Event(), threading.Event()
        self._error: Optional[BaseException] = None
        self._events: List[dict] = []
        self._response: dict = {}
        self._saved = {"thinking": "", "answer": ""}   # what its turn saved: the end of a run cut short
        self._thread = threading.Thread(target=self._run, name="background-response", daemon=True)

    def start(self) -> dict:
        self._thread.start()
        self._opened.wait()
        if self._error is not None:
            raise self._error
        return self._response

    def cancel(self) -> None:
        self._cancelled.set()
        self._stop.set()   # the nodes stop as for a client that hung up

    def _run(self) -> None:
        service, turn_request = self.service, self.turn_request
        saving = turn_request.saving

        def saved(kept: Conversation, thinking: str, answer: str) -> None:
            self._saved = {"thinking": thinking, "answer": answer}
            if saving is not None:
                saving(kept, thinking, answer)
        turn_request.saving = saved
        try:
            opening = service.open_turn if turn_request.conversation else partial(open_chat_turn, service)
            turn = opening(turn_request, self._stop, {})
        except BaseException as exc:   # answered to the request that started it
            self._error = exc
            self._opened.set()
            return
        try:
            with turn:
                try:
                    # A turn with no conversation (a client's task) is kept as a run only.
                    self.response_id = turn_request.response_id or new_response_id(service.new_conversation_id())
                    self.key = background_key(self.response_id)
                    self._response = self._response_as("in_progress")
                    self._write("in_progress")
                except BaseException as exc:
                    self._error = exc
                    self._opened.set()
                    return
                self.runs.add(self)
                self._opened.set()
                try:
                    status = self._play(turn)
                finally:
                    self.runs.discard(self)
                if status != "completed":   # the stored response as the run's record ends it
                    turn_request.response_extra.update(status=status, error=background_error(status))
        except CozyError as exc:   # the turn could not be saved (the store went away): the run failed
            log.error("a background response could not be saved: %s", exc.message)
            status = "failed"
        if self._opened.is_set() and self._error is None:
            self._finish(status)

    def _response_as(self, status: str, **extra: Any) -> dict:
        fields = _stored_fields(self.request, "", "", self.turn_request.response_extra["prompt_tokens"])
        return response_object(self.response_id, self.request.model, dict(fields, status=status, **extra))

    def _play(self, turn: Union[Turn, AnsweredTurn]) -> str:
        """Play the turn, writing its events as they come; how it ended."""
        events = response_event_objects(turn.pieces(BACKGROUND_HEARTBEAT_SECONDS), self.request, self.response_id,
                                        self.turn_request.response_extra["prompt_tokens"])
        written = time.monotonic()
        try:
            for event in events:
                if event is not None:
                    self._events.append(event)
                    if event["type"] == "response.completed":
                        self._response = event["response"]
                if self._cancelled.is_set():
                    return "cancelled"
                if event is None or time.monotonic() - written >= BACKGROUND_FLUSH_SECONDS:
                    stopped = self._write("in_progress")
                    if stopped:
                        self.cancel()
                        return stopped
                    written = time.monotonic()
            return "completed"
        except CozyError as exc:   # the store went away mid-run
            log.error("a background response could not be written: %s", exc.message)
            return "failed"
        except Exception:   # a bug: the run fails, the thread and the server go on
            log.exception("a background response failed")
            return "failed"
        finally:
            events.close()

    def _finish(self, status: str) -> None:
        if status != "completed":   # what the turn wrote before it stopped is kept, as retrieving it shows
            self._response = self._response_as(status, error=background_error(status), **self._saved)
            self._events.append({"type": "response.failed", "sequence_number": len(self._events),
                                 "response": self._response})
        with contextlib.suppress(CozyError):
            self._write(status)

    def _write(self, status: str) -> str:
        """The run's record, written whole with its events so far; how the run must stop, as
        the record says: "cancelled" (a cancel came there), "failed" (a reader took it for dead
        when it missed its lease), or "" (it goes on)."""
        store = self.service.store
        with store.lock(self.key):
            record = store.load(self.key) or {}
            seen = record.get("background") or {}
            stopped = "failed" if seen.get("status") == "failed" else "cancelled" if seen.get("cancel") else ""
            if stopped == "failed" and status == "in_progress":
                return stopped   # left as the reader wrote it
            store.save(self.key, {"id": self.key, "model": "", "background": {
                "response_id": self.response_id, "status": status, "events": self._events, "heartbeat": time.time(),
                "response": self._response, "cancel": bool(seen.get("cancel"))}})
        return stopped


def background_error(status: str) -> dict:
    """The error of a background response that did not complete."""
    return {"code": "cancelled" if status == "cancelled" else "server_error",
            "message": "The response was cancelled." if status == "cancelled" else BACKGROUND_DIED}


def background_run(service: Service, response_id: str) -> Optional[dict]:
    """A background run's record (None: not one), a run past its lease marked failed first."""
    key = background_key(response_id)
    run = (service.store.load(key) or {}).get("background")
    if run is None or run["status"] != "in_progress" or time.time() - run["heartbeat"] < BACKGROUND_LEASE_SECONDS:
        return run
    with service.store.lock(key):
        record = service.store.load(key) or {}
        run = record.get("background")
        if run is not None and run["status"] == "in_progress" and \
                time.time() - run["heartbeat"] >= BACKGROUND_LEASE_SECONDS:
            run["status"] = "failed"
            run["response"] = dict(run["response"], status="failed",
                                   error={"code": "server_error", "message": BACKGROUND_DIED})
            run["events"].append({"type": "response.failed", "sequence_number": len(run["events"]),
                                  "response": run["response"]})
            service.store.save(key, record)
    return run


def background_events(service: Service, response_id: str, starting_after: int,
                      keepalive_seconds: float) -> Iterator[bytes]:
    """A background run's events after ``starting_after``, as server-sent events, read from the
    store as the run writes them (on whatever instance it runs), until its last."""
    sent, quiet_since = max(starting_after + 1, 0), time.monotonic()
    while True:
        run = background_run(service, response_id)
        if run is None:
            return
        for event in run["events"][sent:]:
            yield sse_event(event)
            sent, quiet_since = sent + 1, time.monotonic()
        if run["status"] != "in_progress" and sent >= len(run["events"]):
            return
        if time.monotonic() - quiet_since >= keepalive_seconds:
            yield b": keep-alive\n\n"
            quiet_since = time.monotonic()
        time.sleep(BACKGROUND_POLL_SECONDS)


def cancel_response(service: Service, response_id: str, runs: Optional[BackgroundRuns] = None) -> dict:
    """POST /responses/{id}/cancel: stop a background response, wherever it runs; once it has
    stopped (or BACKGROUND_CANCEL_SECONDS passed), the response as retrieving it shows it."""
    conversation_of_response(response_id)
    key = background_key(response_id)
    with service.store.lock(key):
        record = service.store.load(key) or {}
        run = record.get("background")
        if run is not None and run["status"] == "in_progress":
            run["cancel"] = True
            service.store.save(key, record)
    if run is None:
        stored_response(service, response_id)   # a 404 when there is no such response
        raise RequestError("Only a background response can be cancelled.", param="response_id")
    if runs is not None:
        runs.cancel(response_id)
    deadline = time.monotonic() + BACKGROUND_CANCEL_SECONDS
    while run["status"] == "in_progress" and time.monotonic() < deadline:
        time.sleep(BACKGROUND_POLL_SECONDS)
        run = background_run(service, response_id) or run
    return retrieved_response(service, response_id)


def stored_response(service: Service, response_id: str) -> Any:
    """GET /responses/{id}: a response saved with ``store``, or a background one as it runs;
    with ``stream=true``, a background response's events after ``starting_after``."""
    query = bottle.request.query
    if str(query.get("stream", "")).lower() == "true":
        try:
            starting_after = int(query.get("starting_after") or -1)
        except ValueError:
            raise RequestError("'starting_after' must be a sequence number.", param="starting_after") from None
        conversation_of_response(response_id)
        if background_run(service, response_id) is None:
            raise NotFoundError(f"No background response {response_id!r} to stream.", param="response_id")
        stream_headers()
        return counted_stream(background_events(service, response_id, starting_after, service.keepalive_seconds),
                              service.metrics)
    return retrieved_response(service, response_id)


def retrieved_response(service: Service, response_id: str) -> dict:
    """A response saved with ``store``, or a background one as it runs (a 404 if neither)."""
    record = service.store.load(conversation_of_response(response_id))
    response = (record or {}).get("responses", {}).get(response_id)
    if response is not None:
        return response_object(response_id, record["model"], response)
    run = background_run(service, response_id)
    if run is None:
        raise NotFoundError(f"No stored response {response_id!r}.", param="response_id")
    return run["response"]


def delete_response(service: Service, response_id: str) -> dict:
    conversation_id = conversation_of_response(response_id)
    with service.store.lock(conversation_id):
        record = service.store.load(conversation_id)
        if record is None or response_id not in record.get("responses", {}):
            raise NotFoundError(f"No stored response {response_id!r}.", param="response_id")
        del record["responses"][response_id]
        service.store.save(conversation_id, record)
    key = background_key(response_id)
    with service.store.lock(key):
        if service.store.load(key) is not None:   # its events go too
            service.store.save(key, {"id": key, "model": ""})
    return {"id": response_id, "object": "response.deleted", "deleted": True}


def response_input_items(service: Service, response_id: str) -> dict:
    """GET /responses/{id}/input_items: the items of its input, a page at a time as OpenAI's."""
    record = service.store.load(conversation_of_response(response_id))
    response = (record or {}).get("responses", {}).get(response_id)
    if response is None:
        raise NotFoundError(f"No stored response {response_id!r}.", param="response_id")
    return item_page(response.get("input", []), bottle.request.query)


ITEM_PAGE_LIMIT = 20           # items in a page of a list, unless ``limit`` says otherwise
ITEM_PAGE_MAX_LIMIT = 100


def item_page(items: Sequence[dict], query: Mapping[str, str]) -> dict:
    """A page of ``items`` (oldest first) as OpenAI's lists are paged: ``order`` ("desc", the
    default, newest first), ``limit`` (1 to 100, default 20) and ``after`` (the id the page starts after)."""
    order = query.get("order") or "desc"
    if order not in ("asc", "desc"):
        raise RequestError("'order' must be 'asc' or 'desc'.", param="order")
    try:
        limit = int(query.get("limit") or ITEM_PAGE_LIMIT)
    except ValueError:
        limit = 0
    if not 1 <= limit <= ITEM_PAGE_MAX_LIMIT:
        raise RequestError(f"'limit' must be a whole number from 1 to {ITEM_PAGE_MAX_LIMIT}.", param="limit")
    ordered = list(items) if order == "asc" else list(reversed(items))
    start, after = 0, query.get("after")
    if after:
        start = next((index + 1 for index, item in enumerate(ordered) if item.get("id") == after), -1)
        if start < 0:
            raise RequestError(f"'after': no item with id {after!r} here.", param="after")
    page = ordered[start:start + limit]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": start + limit < len(ordered)}


# The Conversations API: a conversation is a record of the store (so every instance sharing
# it sees it) whose items are the history; a response with ``conversation`` reads them and
# adds its input and output items, and the state of the workflow goes on from the last one.
CONVERSATION_ITEMS_AT_ONCE = 20       # items one create or add request may carry, as OpenAI's


def create_conversation(service: Service) -> dict:
    """POST /conversations: a new conversation, with optional ``items`` and ``metadata``."""
    body = read_body(bottle.request.environ)
    data = _json_body(body, bottle.request.content_type) if body.strip() else {}   # curl -X POST, with no body
    for name in data:
        if name not in ("items", "metadata"):
            raise RequestError(f"Unknown parameter: '{name}'.", param=name, code="unknown_parameter")
    key = service.new_conversation_id()
    conversation = Conversation(id=key, model="", api={"created_at": int(time.time()),
                                                       "metadata": checked_metadata(data.get("metadata")),
                                                       "items": _new_items(key, data.get("items"))})
    with service.store.lock(key):
        service.store.save(key, conversation.to_record())
    return conversation_object(key, conversation.api)


def conversation_object(key: str, api: Mapping[str, Any]) -> dict:
    return {"id": "conv_" + key, "object": "conversation", "created_at": api["created_at"],
            "metadata": api.get("metadata") or {}}


def _new_items(key: str, raw: Any) -> List[dict]:
    """Items given to a conversation, as message items with ids of their own (which name the conversation)."""
    if raw is None:
        return []
    if not isinstance(raw, list) or len(raw) > CONVERSATION_ITEMS_AT_ONCE:
        raise RequestError(f"'items' must be an array of at most {CONVERSATION_ITEMS_AT_ONCE} messages, not "
                           f"{_json_type(raw) if not isinstance(raw, list) else f'{len(raw)} of them'}.", param="items")
    items = []
    for index, item in enumerate(raw):
        if not isinstance(item, dict) or item.get("type", "message") != "message":
            raise RequestError(f"items[{index}]: only messages can be added; a workflow reads no other item.",
                               param=f"items[{index}]")
        message = _input_items(item, index, None, "items")[0]
        items.append(dict(message, id=f"msg_{key}{secrets.token_hex(4)}"))
    return items


@contextlib.contextmanager
def api_conversation(service: Service, conversation_id: str, change: bool = False) -> Iterator[dict]:
    """The record of a Conversations API conversation (a 404 if none); with ``change``, locked,
    and saved when the block ends."""
    key = conversation_key(conversation_id)
    with service.store.lock(key) if change else contextlib.nullcontext():
        record = service.store.load(key)
        if record is None or record.get("api") is None:
            raise NotFoundError(f"Conversation with id {conversation_id!r} not found.", param="conversation_id")
        yield record
        if change:
            service.store.save(key, record)


def retrieve_conversation(service: Service, conversation_id: str) -> dict:
    with api_conversation(service, conversation_id) as record:
        return conversation_object(record["id"], record["api"])


def update_conversation(service: Service, conversation_id: str) -> dict:
    """POST /conversations/{id}: its metadata replaced."""
    data = _json_body(read_body(bottle.request.environ), bottle.request.content_type)
    if "metadata" not in data or set(data) - {"metadata"}:
        raise RequestError("Send 'metadata', and only it, to update a conversation.", param="metadata")
    metadata = checked_metadata(data["metadata"])
    with api_conversation(service, conversation_id, change=True) as record:
        record["api"]["metadata"] = metadata
    return conversation_object(record["id"], record["api"])


def delete_conversation(service: Service, conversation_id: str) -> dict:
    """DELETE /conversations/{id}: the conversation and its items; its responses stay, as OpenAI's do."""
    with api_conversation(service, conversation_id, change=True) as record:
        del record["api"]
    return {"id": conversation_id, "object": "conversation.deleted", "deleted": True}


def list_conversation_items(service: Service, conversation_id: str) -> dict:
    with api_conversation(service, conversation_id) as record:
        return item_page(record["api"]["items"], bottle.request.query)


def add_conversation_items(service: Service, conversation_id: str) -> dict:
    """POST /conversations/{id}/items: messages added at its end; the list of those added."""
    data = _json_body(read_body(bottle.request.environ), bottle.request.content_type)
    if not isinstance(data.get("items"), list) or not data["items"]:
        raise RequestError("'items' must be a non-empty array of messages, not "
                           f"{'an empty array' if data.get('items') == [] else _json_type(data.get('items'))}.",
                           param="items")
    with api_conversation(service, conversation_id, change=True) as record:
        added = _new_items(record["id"], data["items"])
        record["api"]["items"] = record["api"]["items"] + added
    return item_page(added, {"order": "asc", "limit": str(ITEM_PAGE_MAX_LIMIT)})


def retrieve_conversation_item(service: Service, conversation_id: str, item_id: str) -> dict:
    with api_conversation(service, conversation_id) as record:
        found = next((item for item in record["api"]["items"] if item.get("id") == item_id), None)
    if found is None:
        raise NotFoundError(f"Item with id {item_id!r} not found.", param="item_id")
    return found


def delete_conversation_item(service: Service, conversation_id: str, item_id: str) -> dict:
    """DELETE /conversations/{id}/items/{item}: the conversation without that item."""
    with api_conversation(service, conversation_id, change=True) as record:
        items = record["api"]["items"]
        if not any(item.get("id") == item_id for item in items):
            raise NotFoundError(f"Item with id {item_id!r} not found.", param="item_id")
        record["api"]["items"] = [item for item in items if item.get("id") != item_id]
    return conversation_object(record["id"], record["api"])


####################################################################################
# MCP: the workflows as tools, missing inputs asked for by elicitation
####################################################################################

# Streamable HTTP, in both eras of the protocol. The handshake era (2025-03-26 to 2025-11-25):
# initialize, a session id, then requests; what is missing is asked by an elicitation/create
# sent on the call's own stream, so the answer must reach the process that asked. The
# 2026-07-28 era: no session, each request carries its version and the client's capabilities
# in _meta, and a call that needs more returns "input_required" with a sealed requestState
# that any instance holding the same key can continue from (a round-robin balancer is fine).
MCP_VERSIONS = ("2025-11-25", "2025-06-18", "2025-03-26")   # the handshake era, newest first
MCP_MODERN_VERSIONS = ("2026-07-28",)    # the per-request era: server/discover, _meta, requestState
MCP_BATCH_VERSIONS = ("2025-03-26",)     # the one version whose JSON-RPC batches the specification allows
MCP_UNSTATED_VERSION = "2025-03-26"      # a handshake request without MCP-Protocol-Version is read as this
MCP_SESSION_IDLE_SECONDS = 3600.0        # a session unused this long is forgotten (clients may never DELETE)
MCP_ELICIT_SECONDS = 600.0               # how long a person has to answer a form, in either era
MCP_KEEPALIVE_SECONDS = 15.0             # an SSE comment this often while waiting (clients time out at 300 s)
MCP_WAIT_CHECK_SECONDS = 0.5             # how often a waiting elicitation looks for a cancel or a hang-up
MCP_MAX_SESSIONS = 10_000
MCP_LIST_TTL_MILLISECONDS = 300_000      # the tools change only with a restart: clients may cache the list
JSONRPC_PARSE_ERROR, JSONRPC_INVALID_REQUEST, JSONRPC_NO_METHOD, JSONRPC_INVALID_PARAMS = -32700, -32600, -32601, -32602
JSONRPC_INTERNAL_ERROR = -32603
MCP_HEADER_MISMATCH, MCP_UNSUPPORTED_VERSION = -32020, -32022   # the 2026-07-28 era's own codes
MCP_META_VERSION = "io.modelcontextprotocol/protocolVersion"
MCP_META_CAPABILITIES = "io.modelcontextprotocol/clientCapabilities"
MCP_META_SERVER_INFO = "io.modelcontextprotocol/serverInfo"
MCP_STATE_PREFIX = "cz1."                # the requestState format: a version, then nonce, ciphertext, tag
MCP_STATE_NONCE_BYTES, MCP_STATE_TAG_BYTES = 16, 32
REQUEST_ARGUMENT = "request"             # the optional free-text argument, read like a chat message
ASKED_NOTE = " Asked for when left out."   # in the tool's schema: a missing input is gathered, not refused


class McpError(CozyError):
    """A JSON-RPC error (its ``code`` a JSON-RPC number), with the HTTP status it goes out with
    and, for some codes, the ``data`` the specification gives them."""

    def __init__(self, code: int, message: str, status: int = 200, data: Any = None):   # type: ignore[override]
        super().__init__(message)
        self.code, self.status, self.data = code, status, data   # type: ignore[assignment]


@dataclass
class McpSession:
    """One MCP client's session (the handshake era): what it can do, the elicitations waiting
    for its answers, and its calls running, by request id, for notifications/cancelled."""
    version: str
    can_elicit: bool
    used: float = field(default_factory=time.monotonic)
    waiting: Dict[Any, "queue.Queue[dict]"] = field(default_factory=dict)
    calls: Dict[Any, "McpCall"] = field(default_factory=dict)


class McpSessions:
    """Sessions of this process, by id; a handshake-era elicitation's answer must reach the
    process that asked (one process, or sticky sessions in front of several)."""

    def __init__(self) -> None:
        self._sessions: "OrderedDict[str, McpSession]" = OrderedDict()
        self._guard = threading.Lock()

    def open(self, version: str, capabilities: Mapping[str, Any]) -> Tuple[str, McpSession]:
        session = McpSession(version, can_elicit_forms(capabilities))
        session_id = secrets.token_urlsafe(24)
        with self._guard:
            self._forget_idle()
            self._sessions[session_id] = session
            while len(self._sessions) > MCP_MAX_SESSIONS:
                self._sessions.popitem(last=False)
        return session_id, session

    def get(self, session_id: str) -> Optional[McpSession]:
        with self._guard:
            self._forget_idle()
            session = self._sessions.get(session_id)
            if session is not None:
                session.used = time.monotonic()
                self._sessions.move_to_end(session_id)
            return session

    def close(self, session_id: str) -> bool:
        with self._guard:
            return self._sessions.pop(session_id, None) is not None

    def _forget_idle(self) -> None:
        oldest = time.monotonic() - MCP_SESSION_IDLE_SECONDS
        while self._sessions and next(iter(self._sessions.values())).used < oldest:
            self._sessions.popitem(last=False)


def can_elicit_forms(capabilities: Any) -> bool:
    """Whether client capabilities offer form elicitation (``{}`` means forms, as before URLs existed)."""
    elicitation = capabilities.get("elicitation") if isinstance(capabilities, dict) else None
    return isinstance(elicitation, dict) and (not elicitation or "form" in elicitation)


def mcp_tool(workflow: Workflow) -> dict:
    """A workflow as an MCP tool: its query inputs as the input schema (fixed inputs never
    appear), plus the optional free-text ``request``. None is ``required``: a call may leave
    out what it does not know (clients refuse calls that miss a required property), and what
    is missing is then asked for, as in chat."""
    properties = {}
    for name, query in workflow.query_inputs.items():
        properties[name] = input_schema(query)
        if not query.optional:
            description = query.description.rstrip()
            properties[name]["description"] = description + ("" if description.endswith((".", "?", "!")) else ".") \
                + ASKED_NOTE
    properties[REQUEST_ARGUMENT] = {"type": "string", "description": (
        "Optional: what you want, in your own words (\"a week in Lisbon in October, about 1200 euros\"); the values "
        "it states are read from it, and only what is still missing is asked for.")}
    return {"name": workflow.name, "title": workflow.name.replace("-", " ").replace("_", " ").capitalize(),
            "description": workflow.description,
            "inputSchema": {"type": "object", "properties": properties}}


def input_schema(query: QueryInput) -> dict:
    """One input as a JSON schema property, within what MCP elicitation forms allow."""
    if query.type == "choice":
        schema: Dict[str, Any] = {"type": "string", "enum": list(query.choices)}
    elif query.type in NUMERIC_TYPES:
        schema = {"type": "integer" if query.type == "integer" else "number"}
        schema.update({key: bound for key, bound in (("minimum", query.minimum), ("maximum", query.maximum))
                       if bound is not None})
    elif query.type == "boolean":
        schema = {"type": "boolean"}
    else:
        schema = {"type": "string"}
        if query.type in ("email", "url"):
            schema["format"] = "email" if query.type == "email" else "uri"
    schema.update({"title": query.label.capitalize(), "description": query.description})
    if query.optional:
        schema["default"] = query.default
    return schema


def mcp_state_key(secret: Union[str, bytes, None]) -> bytes:
    """The key requestStates are sealed with. From a configured secret, every instance given
    the same one continues the others' gatherings; without one, a random key of this process
    (safe, and enough for one instance and the workers it forks)."""
    if not secret:
        return secrets.token_bytes(32)
    raw = secret.encode("utf-8") if isinstance(secret, str) else bytes(secret)
    return hmac.new(raw, b"cozyopenai mcp request state", hashlib.sha256).digest()


def _keystream(key: bytes, nonce: bytes, length: int) -> bytes:
    """HMAC-SHA256 in counter mode: a stream cipher from the standard library alone."""
    blocks = (hmac.new(key, nonce + counter.to_bytes(8, "big"), hashlib.sha256).digest()
              for counter in range((length + 31) // 32))
    return b"".join(blocks)[:length]


def _xor(data: bytes, stream: bytes) -> bytes:
    return (int.from_bytes(data, "big") ^ int.from_bytes(stream, "big")).to_bytes(len(data), "big")


def _state_keys(key: bytes) -> Tuple[bytes, bytes]:
    # One key for secrecy, another for the tag: never the same key for both uses.
    return (hmac.new(key, b"encrypt", hashlib.sha256).digest(), hmac.new(key, b"authenticate", hashlib.sha256).digest())


def seal_request_state(key: bytes, payload: Mapping[str, Any]) -> str:
    """``payload`` encrypted and authenticated (encrypt-then-MAC): the user's values inside
    are neither readable nor changeable by the client that carries it."""
    encrypt, authenticate = _state_keys(key)
    plain = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    nonce = secrets.token_bytes(MCP_STATE_NONCE_BYTES)
    sealed = nonce + _xor(plain, _keystream(encrypt, nonce, len(plain)))
    tag = hmac.new(authenticate, MCP_STATE_PREFIX.encode() + sealed, hashlib.sha256).digest()
    return MCP_STATE_PREFIX + base64.urlsafe_b64encode(sealed + tag).decode("ascii").rstrip("=")


def open_request_state(key: bytes, token: Any, tool: str, now: Optional[float] = None) -> dict:
    """The payload of a requestState this server sealed for ``tool`` and not yet expired;
    anything else is refused (-32602), never half read."""
    def refused(why: str) -> McpError:
        return McpError(JSONRPC_INVALID_PARAMS, f"The requestState {why}: call the tool again without "
                                                "'requestState' and 'inputResponses' to start over.", 400)
    if not isinstance(token, str) or not token.startswith(MCP_STATE_PREFIX):
        raise refused("is not one this server issued")
    try:
        body = token[len(MCP_STATE_PREFIX):]
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    except (ValueError, TypeError):
        raise refused("is not one this server issued") from None
    if len(raw) < MCP_STATE_NONCE_BYTES + MCP_STATE_TAG_BYTES:
        raise refused("is not one this server issued")
    encrypt, authenticate = _state_keys(key)
    sealed, tag = raw[:-MCP_STATE_TAG_BYTES], raw[-MCP_STATE_TAG_BYTES:]
    if not hmac.compare_digest(tag, hmac.new(authenticate, MCP_STATE_PREFIX.encode() + sealed,
                                             hashlib.sha256).digest()):
        raise refused("was altered, or was sealed with another key")
    nonce, cipher = sealed[:MCP_STATE_NONCE_BYTES], sealed[MCP_STATE_NONCE_BYTES:]
    try:
        payload = json.loads(_xor(cipher, _keystream(encrypt, nonce, len(cipher))).decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise refused("is not one this server issued") from None
    if not isinstance(payload, dict) or payload.get("tool") != tool:
        raise refused(f"belongs to another tool, not {tool!r}")
    if not isinstance(payload.get("expires"), (int, float)) or payload["expires"] < (time.time() if now is None
                                                                                     else now):
        raise refused("has expired (a form not answered in time)")
    return payload


def _jsonrpc(message_id: Any, result: Any = None, error: Optional[McpError] = None) -> dict:
    if error is not None:
        body: Dict[str, Any] = {"code": error.code, "message": error.message}
        if getattr(error, "data", None) is not None:
            body["data"] = error.data
        return {"jsonrpc": "2.0", "id": message_id, "error": body}
    return {"jsonrpc": "2.0", "id": message_id, "result": result}


def _sse_message(message: dict) -> bytes:
    return b"event: message\ndata: " + json.dumps(message, ensure_ascii=False).encode() + b"\n\n"


class McpCall:
    """One tools/call: the arguments read as chat reads a message, what is missing asked for,
    then the workflow run with its progress sent as notifications. It yields JSON-RPC
    messages to stream, and None for a keep-alive.

    The handshake era asks by an elicitation/create on this call's stream and waits for the
    answer; the 2026-07-28 era (``state_key`` given) answers "input_required" with the form and
    a sealed requestState instead, and the retry that carries the answer goes on from there,
    on this instance or another. ``stop`` is the call's stop signal: a cancel or a hang-up sets
    it, and from then on no node starts and nothing more is sent."""

    def __init__(self, service: "Service", message: dict, can_elicit: bool, stop: threading.Event,
                 session: Optional[McpSession] = None, state_key: Optional[bytes] = None):
        params = message.get("params") if isinstance(message.get("params"), dict) else {}
        self.service, self.session, self.id, self.can_elicit = service, session, message.get("id"), can_elicit
        name = params.get("name")
        if name is None or name == "":
            raise McpError(JSONRPC_INVALID_PARAMS, "The tool name is missing: tools/call needs 'params.name', one of "
                                                   "the tools tools/list lists.", 400)
        if not isinstance(name, str):
            raise McpError(JSONRPC_INVALID_PARAMS, f"The tool name 'params.name' must be a string, not "
                                                   f"{_json_type(name)}.", 400)
        if name not in service.workflows:
            raise McpError(JSONRPC_INVALID_PARAMS, f"Unknown tool {name!r}; tools/list lists them.", 400)
        self.workflow = service.workflows[name]
        arguments = params.get("arguments")
        if arguments is not None and not isinstance(arguments, dict):
            raise McpError(JSONRPC_INVALID_PARAMS, f"'arguments' must be an object of input names to values, not "
                                                   f"{_json_type(arguments)}.", 400)
        self.arguments = arguments or {}
        meta = params.get("_meta") if isinstance(params.get("_meta"), dict) else {}
        self.progress_token = meta.get("progressToken")
        self.stop, self.cancelled = stop, False
        self.state_key, self.state, self.responses = state_key, None, {}
        if state_key is not None:
            responses = params.get("inputResponses")
            if responses is not None and not isinstance(responses, dict):
                raise McpError(JSONRPC_INVALID_PARAMS, "'inputResponses' must be an object of the inputRequests' "
                                                       f"keys to their results, not {_json_type(responses)}.", 400)
            self.responses = responses or {}
            if params.get("requestState") is not None:   # opened now: a refused state is an error, not a stream
                self.state = open_request_state(state_key, params["requestState"], name)
        self._waiting: Optional["queue.Queue[dict]"] = None

    def cancel(self) -> None:
        """notifications/cancelled: stop the run, end a wait for an answer; send nothing more."""
        self.cancelled = True
        self.stop.set()
        waiting = self._waiting
        if waiting is not None:
            waiting.put({"cancelled": True})

    def messages(self) -> Iterator[Optional[dict]]:
        """The call's messages; a bug or an odd answer ends it with an isError result, never an
        empty stream the client would wait on (a cancelled call ends with nothing, as asked)."""
        try:
            yield from self._messages()
        except Exception as exc:   # noqa: BLE001 - the call must end with a result
            log.exception("MCP call of %s failed", self.workflow.name)
            yield self._result(f"The server failed while running the tool ({type(exc).__name__}).", is_error=True)
        finally:
            if self.session is not None and self.session.calls.get(self.id) is self:
                del self.session.calls[self.id]

    def _messages(self) -> Iterator[Optional[dict]]:
        workflow = self.workflow
        if self.state is not None:   # a retry with the answer to our form: go on from the state
            values, problems, asked = dict(self.state.get("values") or {}), {}, int(self.state.get("asked") or 0)
            answer = self.responses.get(self.state.get("key"))
            if not isinstance(answer, dict) or answer.get("action") != "accept":
                yield self._declined(answer if isinstance(answer, dict) else {}, workflow.missing(values))
                return
            content = answer.get("content")
            self._take(content if isinstance(content, dict) else {}, values, problems)
        else:
            unknown = [name for name in self.arguments if name not in workflow.query_inputs
                       and name != REQUEST_ARGUMENT]
            values, problems = self._read_arguments()
            refused = [(name, reason) for name, reason in problems.items()   # given, optional, bad: never the default
                       if name in self.arguments and workflow.query_inputs[name].optional]
            request = self.arguments.get(REQUEST_ARGUMENT)
            untold = [] if request is None or isinstance(request, str) else [as_written(request)]   # never skipped
            if refused or unknown or untold:
                yield self._result("Not run: " + "; ".join(
                    [f"the argument {name!r} is not valid ({reason}); correct it, or leave it out for its default "
                     f"({shown_value(workflow.query_inputs[name].default)})" for name, reason in refused]
                    + [f"there is no argument {name!r} (the tool takes {_and_list(list(workflow.query_inputs))} "
                       f"and {REQUEST_ARGUMENT!r})" for name in unknown]
                    + [f"the argument {REQUEST_ARGUMENT!r} must be text, what you want in words, not {written}"
                       for written in untold]) + ".", is_error=True)
                return
            asked = 0
        while True:
            missing = workflow.missing(values)
            if self.cancelled:
                return   # cancelled while the arguments were read: ask nothing, run nothing
            if not missing:
                break
            if not self.can_elicit:
                yield self._result(self._missing_text(missing, problems), is_error=True)
                return
            if asked >= MAX_ASKS_PER_INPUT:
                yield self._result(f"Asked {asked} times without usable values; still missing: "
                                   f"{self._missing_text(missing, problems)}", is_error=True)
                return
            asked += 1
            if self.state_key is not None:
                yield self._input_required(missing, values, problems, asked)
                return
            answer: Dict[str, Any] = {}
            yield from self._elicit(missing, values, problems, answer)
            if self.cancelled or self.stop.is_set():
                return   # the client cancelled or left: no answer is owed
            if answer.get("action") != "accept":
                yield self._declined(answer, missing)
                return
            problems = {}
            content = answer.get("content")
            self._take(content if isinstance(content, dict) else {}, values, problems)
        yield from self._run(values)

    def _declined(self, answer: Mapping[str, Any], missing: Sequence[QueryInput]) -> dict:
        action = answer.get("action")
        return self._result(f"Not run: the user chose to {action if isinstance(action, str) else 'not answer'} "
                            f"instead of giving the {_and_list([query.label for query in missing])}.", is_error=True)

    def _read_arguments(self) -> Tuple[Dict[str, Any], Dict[str, str]]:
        """The arguments checked and coerced with the same code as chat's direct answers;
        ``request`` read by the same pipeline as a chat message."""
        values: Dict[str, Any] = {}
        problems: Dict[str, str] = {}
        text = self.arguments.get(REQUEST_ARGUMENT)
        if isinstance(text, str) and text.strip():
            conversation = Conversation("mcp", self.workflow.name)
            extraction = extract(self.service.llm, self.workflow, conversation, [], valid_text(text), asks=False)
            values.update(extraction.values)
            problems.update(extraction.rejected)
        self._take({name: value for name, value in self.arguments.items() if name != REQUEST_ARGUMENT},
                   values, problems)
        return values, problems

    def _take(self, given: Mapping[str, Any], values: Dict[str, Any], problems: Dict[str, str]) -> None:
        for name, raw in given.items():
            query = self.workflow.query_inputs.get(name)
            if query is None or raw is None or raw == "":
                continue
            try:
                values[name] = field_value(query, raw)   # held to what chat holds a direct answer to
                problems.pop(name, None)
            except ValueError as exc:
                values.pop(name, None)
                problems[name] = str(exc)

    def _missing_text(self, missing: Sequence[QueryInput], problems: Mapping[str, str]) -> str:
        lines = [f"- {query.name}: {problems.get(query.name) or query.description}" for query in missing]
        return (f"The workflow {self.workflow.name!r} needs more inputs before it can run:\n" + "\n".join(lines)
                + "\nCall it again with them (or with a 'request' that states them).")

    def _form(self, missing: Sequence[QueryInput], values: Mapping[str, Any], problems: Mapping[str, str]) -> dict:
        """The elicitation form for exactly the missing inputs, its message phrased as chat would."""
        question = elicitation_message(self.workflow, missing, problems)   # names and asks every field
        if self.service.llm is not None:
            request = str(self.arguments.get(REQUEST_ARGUMENT) or "")
            with contextlib.suppress(UpstreamError):
                phrased = question_with_llm(self.service.llm, self.workflow, missing, values, {}, problems, request)
                said = [request] + [shown_value(value) for value in values.values()]
                named = all(query.label.lower() in phrased.lower() for query in missing)
                if named and check_llm_text(phrased, self.workflow, said, users_language([request])) is None:
                    question = phrased   # checked, and it names every field of the form
        return {"mode": "form", "message": self.workflow.redact(question),
                "requestedSchema": {"type": "object", "properties": {q.name: input_schema(q) for q in missing},
                                    "required": [q.name for q in missing]}}

    def _input_required(self, missing: Sequence[QueryInput], values: Mapping[str, Any],
                        problems: Mapping[str, str], asked: int) -> dict:
        """The 2026-07-28 answer to a call that needs more: the form, and the state to go on from."""
        key = f"ask-{asked}"
        state = seal_request_state(self.state_key or b"", {
            "tool": self.workflow.name, "expires": time.time() + MCP_ELICIT_SECONDS, "asked": asked, "key": key,
            "values": dict(values)})
        return _jsonrpc(self.id, {"resultType": "input_required", "requestState": state, "inputRequests": {
            key: {"method": "elicitation/create", "params": self._form(missing, values, problems)}}})

    def _elicit(self, missing: Sequence[QueryInput], values: Mapping[str, Any], problems: Mapping[str, str],
                answer: Dict[str, Any]) -> Iterator[Optional[dict]]:
        """Ask the person for exactly the missing inputs and wait for the answer, a cancel or a hang-up."""
        session = self.session
        assert session is not None   # the handshake era always has one
        request_id = "elicit-" + secrets.token_hex(6)
        waiting: "queue.Queue[dict]" = queue.Queue()
        session.waiting[request_id], self._waiting = waiting, waiting
        try:
            yield {"jsonrpc": "2.0", "id": request_id, "method": "elicitation/create",
                   "params": self._form(missing, values, problems)}
            deadline = time.monotonic() + MCP_ELICIT_SECONDS
            while time.monotonic() < deadline and not self.stop.is_set():
                try:
                    reply = waiting.get(timeout=MCP_WAIT_CHECK_SECONDS)
                except queue.Empty:
                    continue
                if not reply.get("cancelled"):
                    answer.update(reply.get("result") if isinstance(reply.get("result"), dict) else
                                  {"action": "error"})
                return
            answer["action"] = "let the question time out"
        finally:
            session.waiting.pop(request_id, None)
            self._waiting = None

    def _run(self, values: Dict[str, Any]) -> Iterator[Optional[dict]]:
        workflow, service, answer = self.workflow, self.service, []
        steps = 0   # each node's start and finish is half a step: progress must always rise
        for event in run_events(workflow, workflow.with_defaults(values), node_types=service.node_types,
                                llm=service.llm, stop=self.stop, metrics=service.metrics):
            if event.what in ("started", "finished") and self.progress_token is not None:
                steps += 1
                yield {"jsonrpc": "2.0", "method": "notifications/progress", "params": {
                    "progressToken": self.progress_token, "progress": steps / 2, "total": len(workflow.nodes),
                    "message": workflow.redact(progress_line(event))}}
            elif event.what == "failed":
                if not self.cancelled:
                    yield self._result(f"The workflow stopped: step {event.node_id!r} failed ({event.text}).",
                                       is_error=True)
                return
            elif event.what == "answer":
                answer.append(event.text)
        if self.cancelled:
            return   # the client said it no longer waits for a result (the runner sets stop itself when done)
        yield self._result("".join(answer))

    def _result(self, text: str, is_error: bool = False) -> dict:
        result: Dict[str, Any] = {"content": [{"type": "text", "text": self.workflow.redact(text)}],
                                  "isError": is_error}
        if self.state_key is not None:
            result["resultType"] = "complete"
        return _jsonrpc(self.id, result)


def mcp_initialize(sessions: McpSessions, message: dict) -> Tuple[str, dict]:
    """Agree on a protocol version (the client's when we speak it, else our newest) and open a
    session. Params of the wrong type are refused: a client that sends them is not understood."""
    params = message.get("params") if message.get("params") is not None else {}
    if not isinstance(params, dict):
        raise McpError(JSONRPC_INVALID_PARAMS, f"initialize's 'params' must be an object, not {_json_type(params)}.",
                       400)
    for name, wanted, what in (("protocolVersion", str, "a string"), ("capabilities", dict, "an object")):
        if params.get(name) is not None and not isinstance(params[name], wanted):
            raise McpError(JSONRPC_INVALID_PARAMS, f"initialize's 'params.{name}' must be {what}, not "
                                                   f"{_json_type(params[name])}.", 400)
    asked = params.get("protocolVersion")
    version = asked if asked in MCP_VERSIONS else MCP_VERSIONS[0]
    session_id, _ = sessions.open(version, params.get("capabilities") or {})
    return session_id, _jsonrpc(message.get("id"), {
        "protocolVersion": version, "capabilities": {"tools": {"listChanged": False}},
        "serverInfo": {"name": "cozyopenai", "version": __version__}, "instructions": MCP_INSTRUCTIONS})


MCP_INSTRUCTIONS = ("Each tool runs a workflow. Give the inputs you know as arguments, or describe what you want in "
                    "'request'; missing inputs are asked for when the client supports elicitation, else listed.")


def mcp_post(service: Service, sessions: McpSessions, origins: Sequence[str], state_key: bytes) -> Any:
    """POST /mcp: one JSON-RPC message (or a batch, where allowed) of MCP's Streamable HTTP transport."""
    started, message_id, method = time.monotonic(), None, None
    try:
        _mcp_guard(service, origins)
        body = _mcp_body()
        if isinstance(body, list):
            return _mcp_batch(service, sessions, body, started)
        message = _mcp_message(body)
        method, message_id = message.get("method"), message.get("id")
        if _is_modern(message):
            return mcp_modern(service, message, state_key, started)
        if method == "initialize":   # the version is agreed on here: a header before it says nothing yet
            session_id, reply = mcp_initialize(sessions, message)
            bottle.response.set_header("Mcp-Session-Id", session_id)
            return _mcp_answer(reply, method, started)
        _handshake_version()
        session = _mcp_session(sessions)
        if method == "tools/call" and message_id is not None and \
                "text/event-stream" in bottle.request.get_header("Accept", ""):
            call = McpCall(service, message, session.can_elicit, _stop_signal(), session=session)
            session.calls[call.id] = call   # for notifications/cancelled
            return _mcp_stream(service, call, started)
        reply = mcp_reply(service, session, message)
        if reply is None:
            bottle.response.status = 202
        return _mcp_answer(reply, method or "response", started)
    except McpError as exc:
        bottle.response.status = exc.status
        return _mcp_answer(_jsonrpc(message_id, error=exc), method or "-", started)


def mcp_reply(service: Service, session: McpSession, message: dict) -> Optional[dict]:
    """A handshake-era message answered at once: None for an answer to our elicitation or a
    notification; a tools/call here runs with no questions (a JSON-only client or a batch)."""
    method, message_id = message.get("method"), message.get("id")
    if method is None or message_id is None:   # an answer to our elicitation, or a notification
        if method is None and isinstance(message_id, str):   # our elicitations have string ids
            waiting = session.waiting.get(message_id)
            if waiting is not None:
                waiting.put(message)
        elif method == "notifications/cancelled":
            params = message.get("params") if isinstance(message.get("params"), dict) else {}
            call = session.calls.get(params.get("requestId"))
            if call is not None:
                call.cancel()
        return None
    if method == "ping":
        return _jsonrpc(message_id, {})
    if method == "tools/list":
        return _jsonrpc(message_id, {"tools": [mcp_tool(w) for w in service.workflows.values()]})
    if method == "tools/call":
        call = McpCall(service, message, False, _stop_signal(), session=session)
        return [m for m in call.messages() if m is not None][-1]
    if method == "initialize":
        raise McpError(JSONRPC_INVALID_REQUEST, "initialize must not be part of a batch.", 400)
    raise McpError(JSONRPC_NO_METHOD, f"Method not found: {method!r}.")


def mcp_modern(service: Service, message: dict, state_key: bytes, started: float) -> Any:
    """A request of the 2026-07-28 era: checked against its envelope and headers, then
    answered on its own, with no session."""
    method, message_id = message.get("method"), message.get("id")
    if method is None:
        raise McpError(JSONRPC_INVALID_REQUEST, "Protocol 2026-07-28 has no server requests to answer: send one "
                                                "request or notification.", 400)
    if message_id is None:   # a notification: acknowledged (a cancel is closing the request's stream)
        _modern_version(_modern_version_header())
        bottle.response.status = 202
        return _mcp_answer(None, method, started)
    capabilities = _modern_envelope(message)
    if method == "server/discover":
        return _mcp_answer(_jsonrpc(message_id, {
            "resultType": "complete", "supportedVersions": list(MCP_MODERN_VERSIONS + MCP_VERSIONS),
            "capabilities": {"tools": {"listChanged": False}}, "instructions": MCP_INSTRUCTIONS,
            "ttlMs": MCP_LIST_TTL_MILLISECONDS, "cacheScope": _cache_scope(service),
            "_meta": {MCP_META_SERVER_INFO: {"name": "cozyopenai", "version": __version__}}}), method, started)
    if method == "tools/list":
        return _mcp_answer(_jsonrpc(message_id, {
            "resultType": "complete", "tools": [mcp_tool(w) for w in service.workflows.values()],
            "ttlMs": MCP_LIST_TTL_MILLISECONDS, "cacheScope": _cache_scope(service)}), method, started)
    if method == "tools/call":
        call = McpCall(service, message, can_elicit_forms(capabilities), _stop_signal(), state_key=state_key)
        if "text/event-stream" not in bottle.request.get_header("Accept", ""):
            return _mcp_answer([m for m in call.messages() if m is not None][-1], method, started)
        return _mcp_stream(service, call, started)
    raise McpError(JSONRPC_NO_METHOD, f"Method not found: {method!r} (protocol 2026-07-28 here: server/discover, "
                                      "tools/list and tools/call).", 404)


def _cache_scope(service: Service) -> str:
    # The list holds nothing of one user's; behind API keys it is still not for every cache to share.
    return "private" if service.api_keys else "public"


def _is_modern(message: dict) -> bool:
    """The era of a request: 2026-07-28 by its header, or, with no session, by the envelope in
    its _meta or by being server/discover (which no handshake-era request is)."""
    if message.get("method") == "initialize":
        return False
    if bottle.request.get_header("MCP-Protocol-Version", "") in MCP_MODERN_VERSIONS:
        return True
    if bottle.request.get_header("Mcp-Session-Id"):
        return False
    params = message.get("params")
    meta = params.get("_meta") if isinstance(params, dict) else None
    return message.get("method") == "server/discover" or (isinstance(meta, dict) and MCP_META_VERSION in meta)


def _modern_version(version: Any) -> str:
    if version not in MCP_MODERN_VERSIONS:
        raise McpError(MCP_UNSUPPORTED_VERSION, f"Unsupported protocol version {version!r}; this server speaks "
                                                f"{', '.join(MCP_MODERN_VERSIONS + MCP_VERSIONS)} (the last three "
                                                "with initialize).", 400,
                       {"supported": list(MCP_MODERN_VERSIONS + MCP_VERSIONS), "requested": version})
    return version


def _modern_version_header() -> str:
    header = bottle.request.get_header("MCP-Protocol-Version")
    if header is None:   # said as missing, not as a mismatch with the version in _meta
        raise McpError(MCP_HEADER_MISMATCH, "The MCP-Protocol-Version header is missing: protocol 2026-07-28 sends "
                                            "it with every request, the same as the version in params._meta.", 400)
    return header


def _modern_envelope(message: dict) -> Any:
    """The request's _meta checked as the specification says (envelope, then headers, then
    version); the client's capabilities for this request."""
    params = message.get("params")
    meta = params.get("_meta") if isinstance(params, dict) else None
    if not isinstance(meta, dict):
        raise McpError(JSONRPC_INVALID_PARAMS, f"params._meta must be an object with {MCP_META_VERSION!r} and "
                                               f"{MCP_META_CAPABILITIES!r} (protocol 2026-07-28).", 400)
    absent = [key for key in (MCP_META_VERSION, MCP_META_CAPABILITIES) if key not in meta]
    if absent:
        raise McpError(JSONRPC_INVALID_PARAMS, f"params._meta is missing {_and_list(absent)}.", 400)
    version, header = meta[MCP_META_VERSION], _modern_version_header()
    if header != version:
        raise McpError(MCP_HEADER_MISMATCH, "The MCP-Protocol-Version header must match the protocol version in "
                                            "params._meta.", 400)
    if bottle.request.get_header("Mcp-Method") != message.get("method"):
        raise McpError(MCP_HEADER_MISMATCH, "The Mcp-Method header must match the request's method.", 400)
    name = params.get("name") if message.get("method") == "tools/call" else None
    if name is not None and _header_value(bottle.request.get_header("Mcp-Name")) != name:
        raise McpError(MCP_HEADER_MISMATCH, "The Mcp-Name header must match the tool's name in params.", 400)
    capabilities = meta[MCP_META_CAPABILITIES]
    if not isinstance(capabilities, dict):   # as initialize refuses them: a client not understood
        raise McpError(JSONRPC_INVALID_PARAMS, f"params._meta's {MCP_META_CAPABILITIES!r} must be an object, not "
                                               f"{_json_type(capabilities)}.", 400)
    _modern_version(version)
    return capabilities


def _header_value(value: Optional[str]) -> Optional[str]:
    """A header's text, decoded from the specification's =?base64?...?= form for non-ASCII names."""
    match = re.fullmatch(r"=\?base64\?(.*)\?=", value or "")
    if match is None:
        return value
    try:
        return base64.b64decode(match.group(1), validate=True).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        return None


def _handshake_version() -> str:
    """The MCP-Protocol-Version of a handshake-era request: one we speak (400 otherwise, as
    the specification asks); without the header, 2025-03-26."""
    version = bottle.request.get_header("MCP-Protocol-Version")
    if version is None:
        return MCP_UNSTATED_VERSION
    if version not in MCP_VERSIONS:
        raise McpError(JSONRPC_INVALID_REQUEST, f"Unsupported MCP-Protocol-Version {version!r}; this server speaks "
                                                f"{', '.join(MCP_VERSIONS)} with initialize, and "
                                                f"{', '.join(MCP_MODERN_VERSIONS)} without.", 400)
    return version


def _stop_signal() -> threading.Event:
    return HangUpAwareEvent(bottle.request.environ.get(CONNECTION_ENVIRON_KEY))


def _mcp_stream(service: Service, call: McpCall, started: float) -> Iterator[bytes]:
    stream_headers()
    stream_ending(lambda text: _sse_message(_jsonrpc(call.id, error=McpError(JSONRPC_INTERNAL_ERROR, text))))
    return _logged_when_done(counted_stream(_mcp_events(call), service.metrics), "POST", "/mcp",
                             {"model": call.workflow.name, "conversation": "mcp"}, started)


def _mcp_batch(service: Service, sessions: McpSessions, batch: list, started: float) -> str:
    """A JSON-RPC batch, which only 2025-03-26 allows: each message answered at once, the
    answers in one array (none at all: 202)."""
    if not batch:   # JSON-RPC's own answer to [], whatever the session
        raise McpError(JSONRPC_INVALID_REQUEST, "The batch is empty: send one message, or an array of them.", 400)
    version = _handshake_version()
    session = _mcp_session(sessions)
    if session.version not in MCP_BATCH_VERSIONS or version not in MCP_BATCH_VERSIONS:
        raise McpError(JSONRPC_INVALID_REQUEST, f"JSON-RPC batches are part of protocol {MCP_BATCH_VERSIONS[0]} only; "
                                                f"this session speaks {session.version}: send one message per "
                                                "request.", 400)
    replies = []
    for item in batch:
        try:
            reply = mcp_reply(service, session, _mcp_message(item))
        except McpError as exc:
            reply = _jsonrpc(item.get("id") if isinstance(item, dict) and _is_jsonrpc_id(item.get("id")) else None,
                             error=exc)
        if reply is not None:
            replies.append(reply)
    if not replies:
        bottle.response.status = 202
        return _mcp_answer(None, "batch", started)
    _log_line("POST", "/mcp", bottle.response.status_code, {"model": "batch", "conversation": "mcp"}, started)
    bottle.response.content_type = "application/json"
    return json.dumps(replies, ensure_ascii=False)


def _mcp_guard(service: Service, origins: Sequence[str]) -> None:
    """The API keys, as on /openai; and a browser's Origin must be this server's, loopback's or
    an allowed one (the specification asks servers to refuse others: DNS rebinding)."""
    try:
        check_key(service.api_keys, bottle.request.get_header("Authorization", ""))
    except UnauthorizedError as exc:
        raise McpError(JSONRPC_INVALID_REQUEST, exc.message, 401) from None
    try:
        check_origin(origins, bottle.request.environ)
    except ForbiddenOriginError as exc:
        raise McpError(JSONRPC_INVALID_REQUEST, exc.message, 403) from None


def _mcp_body() -> Any:
    try:
        body = read_body(bottle.request.environ)
    except CozyError as exc:
        raise McpError(JSONRPC_INVALID_REQUEST, exc.message, exc.status) from None
    try:
        text = body.decode("utf-8")
        return with_valid_text(json.loads(text)) if SURROGATE_ESCAPE.search(text) else json.loads(text)
    except (UnicodeDecodeError, ValueError):
        raise McpError(JSONRPC_PARSE_ERROR, "The request body is not valid JSON.", 400) from None
    except RecursionError:   # valid JSON, but past what can be read: the same words as on /openai
        raise McpError(JSONRPC_PARSE_ERROR, "The request body is nested too deeply.", 400) from None


def _mcp_message(message: Any) -> dict:
    if not isinstance(message, dict) or message.get("jsonrpc") != "2.0":
        raise McpError(JSONRPC_INVALID_REQUEST, "Send a JSON-RPC 2.0 message: an object with \"jsonrpc\": \"2.0\".",
                       400)
    if not _is_jsonrpc_id(message.get("id")):
        raise McpError(JSONRPC_INVALID_REQUEST, f"'id' must be a string, a number or null, not "
                                                f"{_json_type(message['id'])}.", 400)
    if message.get("method") is not None and not isinstance(message["method"], str):
        raise McpError(JSONRPC_INVALID_REQUEST, "'method' must be a string.", 400)
    return message


def _is_jsonrpc_id(value: Any) -> bool:
    """JSON-RPC's ids: a string, a number or null (a refused message's error goes out with null)."""
    return value is None or isinstance(value, (str, int, float)) and not isinstance(value, bool)


def _mcp_session(sessions: McpSessions) -> McpSession:
    session_id = bottle.request.get_header("Mcp-Session-Id")
    if not session_id:
        raise McpError(JSONRPC_INVALID_REQUEST, "No session: send initialize first (or speak protocol 2026-07-28, "
                                                "which needs none).", 400)
    session = sessions.get(session_id)
    if session is None:
        raise McpError(JSONRPC_INVALID_REQUEST, "Session not found (ended or expired): initialize again.", 404)
    return session


def _mcp_events(call: McpCall) -> Iterator[bytes]:
    for message in with_keepalives(call.messages(), MCP_KEEPALIVE_SECONDS, call.stop):
        yield b": keep-alive\n\n" if message is None else _sse_message(message)


def _mcp_answer(reply: Optional[dict], method: str, started: float) -> str:
    _log_line("POST", "/mcp", bottle.response.status_code, {"model": method, "conversation": "mcp"}, started)
    if reply is None:
        return ""
    bottle.response.content_type = "application/json"
    return json.dumps(reply, ensure_ascii=False)


def mcp_no_stream() -> str:
    """GET /mcp: no stream of server-initiated messages outside a call; clients go on without it."""
    bottle.response.status = 405
    bottle.response.set_header("Allow", "POST, DELETE")
    return ""


def mcp_delete(service: Service, sessions: McpSessions) -> str:
    try:
        _mcp_guard(service, ())
    except McpError as exc:
        bottle.response.status = exc.status
        return ""
    closed = sessions.close(bottle.request.get_header("Mcp-Session-Id", ""))
    bottle.response.status = 200 if closed else 404
    return ""


####################################################################################
# Metrics
####################################################################################

class Metrics:
    """Counters for ``GET /metrics``, in the Prometheus text format. Names take the
    ``cozyopenai_`` prefix; a summary is written as its ``_sum`` and ``_count``."""

    SERIES = {   # name: (Prometheus type, help)
        "turns_total": ("counter", "Chat turns answered, by model."),
        "turn_seconds": ("summary", "Seconds from a turn's request to its last piece, by model."),
        "runs_total": ("counter", "Workflow runs, by model and outcome."),
        "node_failures_total": ("counter", "Nodes that failed, by node type."),
        "llm_calls_total": ("counter", "Calls to the internal LLM, by outcome."),
        "llm_call_seconds": ("summary", "Seconds per call to the internal LLM (streams: until the first piece)."),
        "llm_format_refusals_total": ("counter", "Structured-output modes the internal LLM refused."),
        "llm_calls_cut_total": ("counter", "Calls to the internal LLM whose connection was closed before their end: "
                                           "the client left, or their time ran out."),
        "repeated_requests_total": ("counter", "Requests answered again: the same one was answered while they waited."),
        "open_streams": ("gauge", "Streamed replies being sent now."),
        "stored_conversations": ("gauge", "Conversations in the store."),
    }

    def __init__(self) -> None:
        self._values: Dict[Tuple[str, Tuple[Tuple[str, str], ...]], float] = {}
        self._lock = threading.Lock()
        # Every turn counts these: their totals are kept in lists, by model (and outcome), and are
        # merged with _values only by render; a key of nested tuples is hashed again at each look-up.
        self._turn_series: Dict[str, List[float]] = {}   # model -> [turns, their seconds] (count_turn)
        self._run_series: Dict[Tuple[str, str], List[float]] = {}   # (model, outcome) -> [runs] (count_run)

    def add(self, name: str, amount: float = 1.0, **labels: str) -> None:
        key = (name, self._labelled(labels) if labels else ())   # a gauge's (open streams): no call
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def observe(self, name: str, seconds: float, **labels: str) -> None:
        self._add_together(self._observed(name, seconds, self._labelled(labels)))

    def count_turn(self, model: str, seconds: float) -> None:
        """A turn answered: turns_total and turn_seconds under one hold of the lock, added to
        the model's totals (render makes them the series)."""
        totals = self._turn_series.get(model)
        if totals is None:   # setdefault: two threads' first turns share one list
            totals = self._turn_series.setdefault(model, [0.0, 0.0])
        # The lock taken without a with block, here and in count_run: its special-method calls
        # cost more than the two additions it guards (every turn counts here).
        lock = self._lock
        lock.acquire()
        try:   # turns_total and turn_seconds_count are the same count
            totals[0] += 1
            totals[1] += seconds
        finally:
            lock.release()

    def count_run(self, model: str, outcome: str) -> None:
        """A workflow run ended: runs_total, added to the total of its model and outcome (every
        turn that runs its workflow counts one; render makes the series)."""
        totals = self._run_series.get((model, outcome))
        if totals is None:
            totals = self._run_series.setdefault((model, outcome), [0.0])
        lock = self._lock
        lock.acquire()
        try:
            totals[0] += 1
        finally:
            lock.release()

    @staticmethod
    def _observed(name: str, seconds: float, labelled: Tuple[Tuple[str, str], ...]) -> Tuple[Tuple[Any, float], ...]:
        """What a summary's observation adds: to its _sum and its _count."""
        return ((name + "_sum", labelled), seconds), ((name + "_count", labelled), 1)

    def _add_together(self, amounts: Iterable[Tuple[Any, float]]) -> None:
        with self._lock:   # a summary's sum and count, and a turn's series, change together
            for key, amount in amounts:
                self._values[key] = self._values.get(key, 0.0) + amount

    @staticmethod
    def _labelled(labels: Mapping[str, str]) -> Tuple[Tuple[str, str], ...]:
        """A series' labels as its key, in one order whatever order they came in."""
        return tuple(sorted(labels.items())) if len(labels) > 1 else tuple(labels.items())

    def render(self, gauges: Mapping[str, float]) -> str:
        with self._lock:
            values = dict(self._values)
            turns = [(model, *totals) for model, totals in self._turn_series.items()]
            runs = [(model, outcome, totals[0]) for (model, outcome), totals in self._run_series.items()]
        # count_turn's and count_run's totals as the series they are; one made but not yet counted is none yet.
        amounts = []
        for model, count, seconds in turns:
            if count:
                labelled = (("model", model),)
                amounts += [(("turns_total", labelled), count), (("turn_seconds_sum", labelled), seconds),
                            (("turn_seconds_count", labelled), count)]
        amounts += [(("runs_total", self._labelled({"model": model, "outcome": outcome})), count)
                    for model, outcome, count in runs if count]
        for key, amount in amounts:
            values[key] = values.get(key, 0.0) + amount
        values.update({(name, ()): value for name, value in gauges.items()})
        lines = []
        for name, (metric_type, text) in self.SERIES.items():
            lines += [f"# HELP cozyopenai_{name} {text}", f"# TYPE cozyopenai_{name} {metric_type}"]
            for suffix in ("_sum", "_count") if metric_type == "summary" else ("",):
                lines += [f"cozyopenai_{name}{suffix}{_labels(labels)} {value:g}"
                          for (key, labels), value in sorted(values.items()) if key == name + suffix]
        return "\n".join(lines) + "\n"


def _labels(labels: Tuple[Tuple[str, str], ...]) -> str:
    escape = lambda value: str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")  # noqa: E731
    return "{" + ",".join(f'{name}="{escape(value)}"' for name, value in labels) + "}" if labels else ""


def _metrics(service: Service) -> str:
    bottle.response.content_type = "text/plain; version=0.0.4; charset=utf-8"
    return metrics_text(service)


def metrics_text(service: Any) -> str:
    """The counters, with the gauges read now."""
    gauges = {}
    with contextlib.suppress(CozyError, OSError, NotImplementedError):   # a store that is down: no gauge
        gauges["stored_conversations"] = service.store.count()
    return service.metrics.render(gauges)


####################################################################################
# Configuration: the options, as flags or COZYOPENAI_* variables
####################################################################################

ENVIRONMENT_PREFIX = "COZYOPENAI_"


def config_from_environment(environ: Mapping[str, str]) -> dict:
    """make_app's arguments from COZYOPENAI_* variables (the flags' names, upper case)."""
    return _config_from_arguments(parse_arguments([], environ))


def _config_from_arguments(arguments: argparse.Namespace) -> dict:
    llm = None
    if arguments.llm_base_url:
        llm = LLMSettings(arguments.llm_base_url, arguments.llm_model, arguments.llm_api_key,
                          timeout_seconds=arguments.llm_timeout,
                          single_call=True if arguments.llm_single_call else False if arguments.llm_question_call
                          else None)
    return {"workflows": arguments.workflows, "store": arguments.store, "llm": llm, "api_keys": arguments.api_key,
            "expire_after_seconds": arguments.expire_days * 86400 if arguments.expire_days else None,
            "thinking": arguments.thinking, "conversation_header": arguments.conversation_header,
            "cors_origins": arguments.cors_origin, "mcp_state_secret": arguments.mcp_state_secret}


def parse_arguments(argv: Optional[Sequence[str]], environ: Mapping[str, str]) -> argparse.Namespace:
    """The command line; every flag's default comes from its COZYOPENAI_* variable."""
    env = lambda name, default=None: environ.get(ENVIRONMENT_PREFIX + name, default)  # noqa: E731
    parser = _OneLineParser(
        prog="cozyopenai", description="Serve the workflows in a workflows file as OpenAI-compatible chat models.",
        epilog="Every flag can also be set as an environment variable: --llm-base-url is COZYOPENAI_LLM_BASE_URL "
               "(several API keys: comma-separated).")
    parser.add_argument("--host", default=env("HOST", DEFAULT_HOST),
                        help="address to listen on (default: %(default)s, loopback only)")
    parser.add_argument("--port", type=int, default=env("PORT", DEFAULT_PORT), help="default: %(default)s")
    parser.add_argument("--workflows", default=env("WORKFLOWS"),
                        help="the workflows file (default: workflows.json here, else the one beside cozyopenai.py)")
    parser.add_argument("--store", default=env("STORE", DEFAULT_STORE),
                        help="'memory', or a directory for the JSON conversation store (default: %(default)s)")
    parser.add_argument("--expire-days", type=float, default=env("EXPIRE_DAYS"),
                        help="forget conversations unused for this many days (default: never)")
    parser.add_argument("--llm-base-url", default=env("LLM_BASE_URL"),
                        help="OpenAI-compatible base URL of the internal LLM, e.g. http://127.0.0.1:8080/v1")
    parser.add_argument("--llm-model", default=env("LLM_MODEL"), help="model name on that server (default: default)")
    parser.add_argument("--llm-api-key", default=env("LLM_API_KEY", ""),
                        help="key for the internal LLM (better: the COZYOPENAI_LLM_API_KEY variable)")
    parser.add_argument("--llm-timeout", type=float, default=env("LLM_TIMEOUT", LLM_TIMEOUT_SECONDS),
                        help="seconds to wait for the internal LLM (default: %(default)s)")
    single_call = env("LLM_SINGLE_CALL", "").lower()
    parser.add_argument("--llm-single-call", action="store_true", default=single_call in ("1", "true", "yes", "on"),
                        help="the extraction call writes the question even where the LLM takes no structured "
                             "output (by default it does where it does)")
    parser.add_argument("--llm-question-call", action="store_true",
                        default=single_call in ("0", "false", "no", "off") or
                        env("LLM_QUESTION_CALL", "").lower() in ("1", "true", "yes", "on"),
                        help="a call of its own writes the question: two LLM calls per gathering turn")
    parser.add_argument("--api-key", action="append", default=None,
                        help="require this Bearer key on /openai routes (repeat for several keys)")
    parser.add_argument("--thinking", choices=THINKING_STYLES, default=env("THINKING", "tags"),
                        help="progress as a <thinking> block in the content, or in the reasoning_content field")
    parser.add_argument("--conversation-header", default=env("CONVERSATION_HEADER"),
                        help="key conversations by this request header (e.g. X-OpenWebUI-Chat-Id) instead of "
                             "the identifier block, which is then not shown")
    parser.add_argument("--cors-origin", action="append", default=None,
                        help="allow browser clients from this origin ('*' for any; repeat for several)")
    parser.add_argument("--mcp-state-secret", default=env("MCP_STATE_SECRET"),
                        help="secret that seals MCP's requestState; give every instance the same one (better: "
                             "the COZYOPENAI_MCP_STATE_SECRET variable; default: random per start)")
    parser.add_argument("--server", default=env("SERVER", "default"),
                        help="'default' (built in), or a server Bottle can run if it is installed: "
                             "gunicorn, waitress, cheroot, ...")
    parser.add_argument("--workers", type=int, default=env("WORKERS", 1),
                        help="worker processes, with --server gunicorn (share a JSON store; default: %(default)s)")
    parser.add_argument("--threads", type=int, default=env("THREADS", SERVER_THREADS),
                        help="threads per worker with --server gunicorn, waitress or cheroot; each open "
                             "stream holds one (default: %(default)s)")
    parser.add_argument("--request-line-timeout", type=float, default=env("REQUEST_LINE_TIMEOUT", REQUEST_LINE_SECONDS),
                        help="built-in server: seconds a new connection has to send its request line, else 408 "
                             "(default: %(default)s)")
    parser.add_argument("--header-timeout", type=float, default=env("HEADER_TIMEOUT", HEADER_SECONDS),
                        help="built-in server: seconds for the header fields after it (default: %(default)s)")
    parser.add_argument("--body-timeout", type=float, default=env("BODY_TIMEOUT", BODY_PAUSE_SECONDS),
                        help="built-in server: the longest pause while a request body arrives, else 408 "
                             "(default: %(default)s)")
    parser.add_argument("--max-connections", type=int, default=env("MAX_CONNECTIONS", MAX_CONNECTIONS),
                        help="built-in server: connections open at once; past them, a 503 (default: %(default)s)")
    parser.add_argument("--shutdown-grace", type=float, default=env("SHUTDOWN_GRACE", SHUTDOWN_GRACE_SECONDS),
                        help="built-in server: on SIGTERM or Ctrl-C, seconds running turns have to finish before "
                             "open streams are ended with an error (default: %(default)s)")
    parser.add_argument("--log-level", default=env("LOG_LEVEL", "INFO"), help="default: %(default)s")
    parser.add_argument("--version", action="version", version=f"cozyopenai {__version__}")
    arguments = parser.parse_args(argv)
    if arguments.log_level.upper() not in LOG_LEVELS:
        parser.error(f"--log-level must be one of {', '.join(LOG_LEVELS)}, not {arguments.log_level!r}")
    _check_numbers(parser, arguments)
    if arguments.llm_model and not arguments.llm_base_url:
        parser.error("--llm-model needs --llm-base-url, the address of the LLM's OpenAI-compatible API")
    arguments.llm_model = arguments.llm_model or "default"
    for name in ("api_key", "cors_origin"):
        if getattr(arguments, name) is None:
            setattr(arguments, name, [item.strip() for item in env(name.upper(), "").split(",") if item.strip()])
    return arguments


class _OneLineParser(argparse.ArgumentParser):
    """A bad option is one line on stderr and exit status 2, without the whole usage text."""

    def error(self, message: str) -> "NoReturn":
        self.exit(2, f"cozyopenai: {message} (see --help)\n")


def _check_numbers(parser: argparse.ArgumentParser, arguments: argparse.Namespace) -> None:
    """Numbers that must be positive, refused in one line (exit status 2) rather than later."""
    for flag, value, smallest in (("--expire-days", arguments.expire_days, None),
                                  ("--llm-timeout", arguments.llm_timeout, None),
                                  ("--workers", arguments.workers, 1), ("--threads", arguments.threads, 1),
                                  ("--request-line-timeout", arguments.request_line_timeout, None),
                                  ("--header-timeout", arguments.header_timeout, None),
                                  ("--body-timeout", arguments.body_timeout, None),
                                  ("--max-connections", arguments.max_connections, 1),
                                  ("--shutdown-grace", arguments.shutdown_grace, 0)):
        if value is not None and (value < smallest if smallest is not None else value <= 0):
            parser.error(f"{flag} must be {'at least %d' % smallest if smallest is not None else 'positive'}, "
                         f"not {value:g}")
    if not 0 <= arguments.port <= 65535:
        parser.error(f"--port must be from 0 to 65535, not {arguments.port}")


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


####################################################################################
# Routes and the app factory
####################################################################################

def make_app(workflows: Union[str, os.PathLike, dict, list, None] = None, *,
             store: Union[str, os.PathLike, Any, None] = None, llm: Optional[LLMSettings] = None,
             api_keys: Optional[Sequence[str]] = None, node_types: Optional[Mapping[str, NodeType]] = None,
             keepalive_seconds: Optional[float] = None, expire_after_seconds: Optional[float] = None,
             thinking: Optional[str] = None, conversation_header: Optional[str] = None,
             cors_origins: Optional[Sequence[str]] = None,
             mcp_state_secret: Union[str, bytes, None] = None) -> bottle.Bottle:
    """A Bottle app serving ``workflows`` (a path, or the file's data as dicts).

    ``store`` is "memory", a directory for the JSON store (the default, "conversations"),
    or a store object (see open_store). ``llm`` enables LLM extraction, questions and `llm`
    nodes. ``api_keys``, when given, are required as Bearer tokens. ``node_types`` adds to
    or replaces the built-in node types. ``keepalive_seconds``: how often a silent stream
    gets an SSE comment. ``expire_after_seconds``: conversations unused that long are
    forgotten. ``thinking``: "tags" (a <thinking> block in the content, the default) or
    "reasoning_content" (progress in that field). ``conversation_header``: key conversations
    by this request header (Open WebUI's X-OpenWebUI-Chat-Id) instead of the id block.
    ``cors_origins``: browser origins allowed to call the API ("*" for any).
    ``mcp_state_secret``: the secret MCP's requestStates are sealed with; instances given the
    same one continue each other's gatherings (default: a random key of this app). With no
    arguments at all, the configuration comes from the COZYOPENAI_* environment variables
    (for ``gunicorn 'cozyopenai:make_app()'``).
    """
    arguments = (workflows, store, llm, api_keys, node_types, keepalive_seconds, expire_after_seconds, thinking,
                 conversation_header, cors_origins, mcp_state_secret)
    if MISSING_PACKAGE is not None:
        raise MISSING_PACKAGE
    if all(argument is None for argument in arguments):
        _log_requests_under_a_wsgi_server(os.environ.get(ENVIRONMENT_PREFIX + "LOG_LEVEL", "INFO"))
        return make_app(**config_from_environment(os.environ))
    all_node_types = MappingProxyType({**NODE_TYPES, **(node_types or {})})
    source = workflows or default_workflows_path()
    metrics = Metrics()
    try:
        loaded = load_workflows(source, all_node_types)
    except RecursionError:   # the JSON parser or the validator went deeper than Python allows
        where = os.fspath(source) if isinstance(source, (str, os.PathLike)) else "the workflows given to make_app"
        raise WorkflowFileError(f"{where}: nested too deeply (over {sys.getrecursionlimit()} levels) to be "
                                "checked; a workflows file needs a few levels only") from None
    service = Service(workflows=loaded,
                      store=open_store(store or DEFAULT_STORE, expire_after_seconds),
                      llm=LLMClient(llm, metrics) if llm else None, node_types=all_node_types,
                      api_keys=api_keys or (), keepalive_seconds=keepalive_seconds or KEEPALIVE_SECONDS,
                      thinking=thinking or "tags", conversation_header=conversation_header, metrics=metrics,
                      workflows_source=os.path.abspath(source) if isinstance(source, (str, os.PathLike))
                      else "the workflows given to make_app")
    if service.thinking not in THINKING_STYLES:
        raise ValueError(f"thinking must be one of {', '.join(THINKING_STYLES)}")
    for workflow in loaded.values():
        prepare_reader(workflow)
    sessions, runs, state_key = McpSessions(), BackgroundRuns(), mcp_state_key(mcp_state_secret)
    app = bottle.Bottle()

    def json_route(path: str, method: str, handler: Callable[..., Any], with_environ: bool = False) -> None:
        # Bottle's JSON plugin would wrap each route in one more call, to turn a dict into JSON:
        # _json_route's own wrapper does that, and gives Bottle the JSON's bytes.
        app.route(path, method, _json_route(service, handler, with_environ), skip=[bottle.JSONPlugin])
    # Clients configured with a "/v1" suffix or a trailing slash ask for these paths too.
    for prefix in ("/openai", "/openai/v1", "/openai/", "/openai/v1/"):
        json_route(prefix + "/models", "GET", list_models)
        json_route(prefix + "/models/<model_id:path>", "GET", get_model)
        json_route(prefix + "/chat/completions", "POST", chat_completions, with_environ=True)
        json_route(prefix + "/responses", "POST", partial(create_response, runs=runs), with_environ=True)
        json_route(prefix + "/responses/<response_id>/cancel", "POST", partial(cancel_response, runs=runs))
        json_route(prefix + "/responses/<response_id>", "GET", stored_response)
        json_route(prefix + "/responses/<response_id>", "DELETE", delete_response)
        json_route(prefix + "/responses/<response_id>/input_items", "GET", response_input_items)
        json_route(prefix + "/conversations", "POST", create_conversation)
        json_route(prefix + "/conversations/<conversation_id>", "GET", retrieve_conversation)
        json_route(prefix + "/conversations/<conversation_id>", "POST", update_conversation)
        json_route(prefix + "/conversations/<conversation_id>", "DELETE", delete_conversation)
        json_route(prefix + "/conversations/<conversation_id>/items", "GET", list_conversation_items)
        json_route(prefix + "/conversations/<conversation_id>/items", "POST", add_conversation_items)
        json_route(prefix + "/conversations/<conversation_id>/items/<item_id>", "GET", retrieve_conversation_item)
        json_route(prefix + "/conversations/<conversation_id>/items/<item_id>", "DELETE", delete_conversation_item)
    app.route("/health", "GET", lambda: _health(service))
    json_route("/metrics", "GET", _metrics)
    app.route("/", "GET", lambda: _home(service))
    for path in ("/mcp", "/mcp/"):
        app.route(path, "POST", lambda: mcp_post(service, sessions, cors_origins or (), state_key))
        app.route(path, "GET", mcp_no_stream)
        app.route(path, "DELETE", lambda: mcp_delete(service, sessions))
    if cors_origins:
        app.route("/openai/<path:path>", "OPTIONS", lambda path: "")   # preflight; headers from the hook
        app.route("/mcp", "OPTIONS", lambda: "")
        app.add_hook("after_request", lambda: _allow_origin(cors_origins))
    app.add_hook("before_request", partial(_guard_the_edge, service, cors_origins or ()))
    app.default_error_handler = _error_page
    app.config["cozyopenai.service"] = service
    return app


MAX_HEADER_BYTES = 64 * 1024               # all header fields together; nginx allows 32 KiB, gunicorn about 800 KiB
CONTENT_LENGTH_DIGITS = re.compile(r"\A[0-9]{1,18}\Z")


def is_mcp_path(path: str) -> bool:
    return path == "/mcp" or path.startswith("/mcp/")


def is_keyed_path(path: str) -> bool:
    """Paths the API keys guard: everything under /openai and /mcp, routes or not."""
    return path == "/openai" or path.startswith("/openai/") or is_mcp_path(path)


def edge_error_body(path: str, error: CozyError) -> bytes:
    """An error found before a route ran, in the protocol of its path: a JSON-RPC error on
    /mcp, an OpenAI error object anywhere else."""
    if is_mcp_path(path):
        return json.dumps(_jsonrpc(None, error=McpError(JSONRPC_INVALID_REQUEST, error.message, error.status))).encode()
    return json.dumps(error.to_openai()).encode()


def check_framing(environ: Mapping[str, Any]) -> None:
    """The request's framing, as strict servers (nginx, gunicorn) check it: Content-Length in
    digits only, Transfer-Encoding only chunked, headers under MAX_HEADER_BYTES. Run before
    any route, so Bottle never parses a bad length itself (its int() was a 500)."""
    length, coding = environ.get("CONTENT_LENGTH"), environ.get("HTTP_TRANSFER_ENCODING")
    length = None if length == "" else length   # wsgiref's empty default: no Content-Length
    # Most lengths are a str of ASCII digits, which the pattern takes as they are: its match
    # (and the strip before it) only for the others. In ASCII only 0 to 9 are isdigit().
    if length is not None and not (length.__class__ is str and length.isdigit() and length.isascii()
                                   and len(length) <= 18) \
            and not CONTENT_LENGTH_DIGITS.match(str(length).strip(" \t")):
        raise RequestError(f"Content-Length must be the body's size in decimal digits, not {str(length)[:40]!r}.",
                           code="invalid_content_length")
    if coding is not None and str(coding).strip(" \t").lower() != "chunked":
        raise RequestError(f"Transfer-Encoding must be 'chunked', not {str(coding)[:40]!r}.",
                           code="invalid_transfer_encoding")
    # Each field as "Name: value\r\n"; the HTTP_ keys picked by comparing, which takes no call
    # and no new string per key of the environ (its server's and Bottle's are most of them).
    # A loop, not a comprehension (one more function call); "HTTP`" compared first, which
    # most keys are past (wsgi.*, bottle.*, REQUEST_*, SERVER_*): one comparison for them.
    # Over the keys, not the items: a value is looked up only for the few HTTP_ keys.
    size = 0
    for key in environ:
        if key < "HTTP`" and key >= "HTTP_":
            value = environ[key]
            if isinstance(value, str):
                size += len(key) - 5 + len(value) + 4
    if size > MAX_HEADER_BYTES:
        raise HeadersTooLargeError(f"The request's header fields are over the limit of {MAX_HEADER_BYTES} bytes.")


def _guard_the_edge(service: Service, origins: Sequence[str]) -> None:
    """Before any route: the framing, then the API key on every path it guards, so that an
    unknown path under /openai is a 401 without a key (a 404 would tell what exists), then
    a browser's Origin on anything that changes state. A CORS preflight carries no key: with
    origins allowed, OPTIONS passes."""
    environ = bottle.request.environ
    # The request's method and path, as bottle.request gives them, read from the environ at
    # once (each bottle.request attribute is a thread-local look-up); the route's log line reads them.
    method, path = environ.get("REQUEST_METHOD", "GET").upper(), "/" + environ.get("PATH_INFO", "").lstrip("/")
    try:
        check_framing(environ)
        environ[REQUEST_LINE_ENVIRON_KEY] = (method, path)   # after the framing's look over the keys: one key less
        if service.api_keys and is_keyed_path(path) and not (origins and method == "OPTIONS"):
            check_key(service.api_keys, bottle.request.get_header("Authorization", ""))
        if "HTTP_ORIGIN" in environ and method not in ("GET", "HEAD", "OPTIONS") and not path.startswith("/mcp"):
            check_origin(origins, environ)   # a browser's (/mcp answers its own refusal, in JSON-RPC)
    except CozyError as exc:
        _log_line(method, path, exc.status, {}, time.monotonic())
        raise bottle.HTTPResponse(edge_error_body(path, exc), exc.status, {"Content-Type": "application/json"})


def _log_requests_under_a_wsgi_server(level: str) -> None:
    """gunicorn and the like configure their own loggers, not ours: without this, the request
    lines would go nowhere. Only when nobody configured logging, so an embedding app decides."""
    if not log.handlers and not logging.getLogger().handlers:
        log.addHandler(log_line_handler())
        log.propagate = False   # waitress configures the root logger later: one line, not two
        known = level.upper() in LOG_LEVELS
        log.setLevel(level.upper() if known else "INFO")
        if not known:
            log.warning("unknown COZYOPENAI_LOG_LEVEL %r; using INFO (one of %s)", level, ", ".join(LOG_LEVELS))


def _json_route(service: Service, handler: Callable[..., Any], with_environ: bool = False) -> Callable[..., Any]:
    """Wrap ``handler(service, **url_args)``, or ``handler(service, environ)`` ``with_environ``
    (the turn routes, which read the request's environ: the route's, read once, not a second
    thread-local look-up): API key check, CozyError → OpenAI error object
    with its status, and one log line per request (a stream's when it ends). A handler sets
    no status: it answers 200, or raises the CozyError that says its status, so the log line
    knows the status without asking Bottle's thread-local response for it."""
    def route(**url_args: Any) -> Any:
        started, trace, status = time.monotonic(), {}, 200
        environ = bottle.request.environ
        environ[TRACE_ENVIRON_KEY] = trace
        try:
            if service.api_keys:
                check_key(service.api_keys, bottle.request.get_header("Authorization", ""))
            if with_environ:
                result = handler(service, environ)
            else:
                result = handler(service, **url_args) if url_args else handler(service)   # no dict unpacked, most often
        except CozyError as exc:
            result, status = _error_response(exc), exc.status
        if isinstance(result, dict):   # as bytes: Bottle would look up the charset to encode a str
            bottle.response.set_header("Content-Type", "application/json")   # so UTF-8, as json_text is written
            result = json_text(result).encode()
        method, path = environ[REQUEST_LINE_ENVIRON_KEY]   # the edge guard's, run before every route
        if isinstance(result, (str, bytes)):
            _log_line(method, path, status, trace, started)
            return result
        if isinstance(result, StreamedTurn):   # it calls back when it ends: no generator around each piece
            result.when_closed(partial(_log_line, method, path, 200, trace, started))
            return result
        return _logged_when_done(result, method, path, trace, started)
    return route


def _allow_origin(origins: Sequence[str]) -> None:
    origin = bottle.request.get_header("Origin")
    if origin and ("*" in origins or origin in origins):
        bottle.response.set_header("Access-Control-Allow-Origin", origin)
        bottle.response.set_header("Vary", "Origin")
        bottle.response.set_header("Access-Control-Allow-Methods", "GET, POST, DELETE, OPTIONS")
        bottle.response.set_header("Access-Control-Allow-Headers",
                                   bottle.request.get_header("Access-Control-Request-Headers") or
                                   "Authorization, Content-Type")
        bottle.response.set_header("Access-Control-Max-Age", "600")
        bottle.response.set_header("Access-Control-Expose-Headers", "Mcp-Session-Id")


HOME_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">
<title>cozyopenai</title>
<style>body{{font:16px/1.5 system-ui,sans-serif;max-width:48em;margin:2em auto;padding:0 1em;color:#222}}
code,pre{{background:#f3f3f3;border-radius:4px;padding:.1em .3em}}pre{{padding:.8em;overflow-x:auto}}</style>
</head><body>
<h1>cozyopenai</h1>
<p>Workflows served as OpenAI-compatible chat models. Give your client (the <code>openai</code> library,
Open WebUI, ...) this base URL: <code id="base-url">{base}</code>{key}</p>
<h2>Models</h2>
{models}
<h2>Try it</h2>
<pre>curl -N {base}/chat/completions -H "Content-Type: application/json"{auth} \\
  -d '{{"model": "{first}", "messages": [{{"role": "user", "content": "Hello"}}], "stream": true}}'</pre>
</body></html>
"""


def home_page(service: Service, base: str) -> str:
    """A page for people who open the server in a browser: the models, what each asks for,
    and how to connect. Fixed inputs are never listed; with API keys, nor are the models."""
    escape = html.escape
    keyed = bool(service.api_keys)
    if keyed:   # the key guards the models: the page says only how to connect
        return HOME_PAGE.format(base=escape(base), first="MODEL", auth=' -H "Authorization: Bearer $KEY"',
                                key=" and an API key (ask whoever runs this server).",
                                models="<p>With a key, <code>GET /openai/models</code> lists them.</p>")
    models = []
    for workflow in service.workflows.values():
        inputs = "".join(f"<li><b>{escape(query.label)}</b> ({escape(query.type)}"
                         f"{', optional' if query.optional else ''}): {escape(query.description)}</li>"
                         for query in workflow.query_inputs.values())
        models.append(f'<h3 class="model">{escape(workflow.name)}</h3><p>{escape(workflow.description)}</p>'
                      + (f"<ul>{inputs}</ul>" if inputs else ""))
    return HOME_PAGE.format(base=escape(base), models="\n".join(models), first=escape(next(iter(service.workflows))),
                            key=". No key is needed.", auth="")


def _home(service: Service) -> str:
    """GET /: the page for browsers; for API clients, an OpenAI error that says where the API is."""
    if "text/html" not in bottle.request.get_header("Accept", ""):
        return _error_response(NotFoundError(f"This is an OpenAI-compatible API under /openai: give clients the "
                                             f"base URL {_base_url()} (GET /openai/models lists the models)."))
    bottle.response.content_type = "text/html; charset=utf-8"
    return home_page(service, _base_url())


def _base_url() -> str:
    parts = bottle.request.urlparts
    return f"{parts.scheme}://{parts.netloc}/openai"


def _health(service: Service) -> dict:
    """For load balancers: 200 while the server can serve turns, 503 while its store is down."""
    if not getattr(service.store, "ping", lambda: True)():
        bottle.response.status = 503
        return {"status": "store unavailable", "models": len(service.workflows)}
    return {"status": "ok", "models": len(service.workflows)}


def _error_page(http_error: bottle.HTTPError) -> str:
    """Bottle's own errors (no route, wrong method, an uncaught exception) as OpenAI errors (on
    /mcp, JSON-RPC errors); a path outside the API says where the API is (a base URL without /openai is a common slip)."""
    error_class = HTTP_STATUS_ERRORS.get(http_error.status_code)
    if error_class is None:
        error = CozyError("The server failed to answer this request.")
    elif error_class is NotFoundError and not bottle.request.path.startswith("/openai"):
        error = NotFoundError(f"No route for {bottle.request.method} {bottle.request.path}. The API is under "
                              f"/openai: give clients the base URL {_base_url()} (for example POST "
                              "/openai/chat/completions).")
    elif error_class is NotFoundError:
        error = NotFoundError(f"No route for {bottle.request.method} {bottle.request.path}.")
    elif error_class is MethodNotAllowedError:
        error = MethodNotAllowedError(f"{bottle.request.method} is not allowed on {bottle.request.path}.")
    else:
        error = error_class(str(http_error.body or "Bad request."))
    if is_mcp_path(bottle.request.path):   # /mcp speaks JSON-RPC, its errors too
        bottle.response.status = error.status
        bottle.response.content_type = "application/json"
        return edge_error_body(bottle.request.path, error).decode()
    return _error_response(error)


####################################################################################
# Server and command line
####################################################################################

@dataclass(frozen=True)
class ServerLimits:
    """What the built-in server allows a client: seconds to send the request line once
    connected, then its header fields, and the longest pause while the body arrives (a
    slow client cannot hold a thread longer); open connections at once (past them, a 503)."""
    request_line_seconds: float = REQUEST_LINE_SECONDS
    header_seconds: float = HEADER_SECONDS
    body_pause_seconds: float = BODY_PAUSE_SECONDS
    max_connections: int = MAX_CONNECTIONS


class _ThreadingWSGIServer(WSGIServer):
    """wsgiref's server with a thread per open connection, so a second client never waits
    for a stream. A thread that has answered waits IDLE_THREAD_SECONDS for the next
    connection instead of ending (a new thread per request costs more than the whole turn
    of a small workflow, measured in bench/); at most IDLE_THREADS_KEPT wait, so a burst of
    connections does not leave its threads behind. Past ``limits.max_connections`` open
    connections, a new one is answered 503 by one thread of its own and closed."""
    allow_reuse_address = True
    # socketserver's default backlog is 5: a burst of clients beyond that had their connections
    # dropped and retried by the kernel, seconds later (200 streams at once waited up to 55 s).
    request_queue_size = LISTEN_BACKLOG

    def __init__(self, *args: Any, limits: ServerLimits = ServerLimits(), **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.limits = limits
        self._waiting: "queue.SimpleQueue[Tuple[Any, Any]]" = queue.SimpleQueue()
        self._idle_threads = 0
        self._open_connections = 0
        self._pool_lock = threading.Lock()
        self._refused: "Optional[queue.SimpleQueue[Any]]" = None
        self._active: set = set()   # the handlers answering now, for a shutdown to wait on or cut short
        self._active_changed = threading.Condition(self._pool_lock)

    def track(self, handler: "_LoggingHandler", active: bool) -> None:
        with self._active_changed:
            (self._active.add if active else self._active.discard)(handler)
            self._active_changed.notify_all()

    def drain(self, grace_seconds: float, message: str = SHUTDOWN_MESSAGE,
              hurry: Optional[threading.Event] = None) -> int:
        """A graceful end, once serve_forever has returned: stop listening, let the requests
        being answered finish for ``grace_seconds`` (or until ``hurry`` is set), then end each
        one still open with an error its client can see. Returns how many were cut short."""
        self.server_close()   # new connections are refused from now on
        deadline = time.monotonic() + grace_seconds
        with self._active_changed:
            while self._active and time.monotonic() < deadline and not (hurry and hurry.is_set()):
                self._active_changed.wait(min(0.05, max(0.0, deadline - time.monotonic())))
            open_now = list(self._active)
        for handler in open_now:
            handler.cut_short(message)
        with self._active_changed:   # their threads notice at their next write; one stuck in a node may not
            self._active_changed.wait_for(lambda: not self._active, timeout=0.2)
        return len(open_now)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._pool_lock:
            if self._open_connections >= self.limits.max_connections:
                self._refuse(request)
                return
            self._open_connections += 1
            if self._idle_threads:
                self._idle_threads -= 1
                self._waiting.put((request, client_address))
                return
        threading.Thread(target=self._serve_connections, args=(request, client_address), daemon=True).start()

    def _serve_connections(self, request: Any, client_address: Any) -> None:
        while True:
            try:
                self.finish_request(request, client_address)
            except Exception:
                self.handle_error(request, client_address)
            finally:
                self.shutdown_request(request)
            with self._pool_lock:
                self._open_connections -= 1
                if self._idle_threads >= IDLE_THREADS_KEPT:
                    return
                self._idle_threads += 1
            try:
                request, client_address = self._waiting.get(timeout=IDLE_THREAD_SECONDS)
            except queue.Empty:
                with self._pool_lock:   # a connection may have been handed over just now
                    try:
                        request, client_address = self._waiting.get_nowait()
                    except queue.Empty:
                        self._idle_threads -= 1
                        return

    def _refuse(self, request: Any) -> None:
        """Hand a connection past the cap to the one thread that answers them all (called
        under the pool lock): the accepting thread never waits on a client."""
        if self._refused is None:
            self._refused = queue.SimpleQueue()
            threading.Thread(target=self._answer_refused, daemon=True).start()
        self._refused.put(request)

    def _answer_refused(self) -> None:
        assert self._refused is not None
        while True:
            connection, head = self._refused.get(), b""
            try:
                connection.settimeout(REFUSAL_READ_SECONDS)
                with contextlib.suppress(OSError):
                    head = connection.recv(65536)   # read what was sent, so closing does not reset the answer
                path = head.split(b" ", 2)[1].decode("latin-1") if head.count(b" ") >= 2 else ""
                error = ServerBusyError(f"The server has {self.limits.max_connections} connections open, its "
                                        "limit; try again in a moment.")
                body = edge_error_body(path, error)
                connection.sendall(b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                                   b"Retry-After: 1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
                                   % (len(body), body))
                connection.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            finally:
                connection.close()


class _SocketReader(io.RawIOBase):
    """The connection's bytes for the handler's rfile, each read bounded in time: by a
    ``deadline`` (the request line, the header fields: a client that trickles them in
    cannot stretch them) and by the longest ``pause`` (the body). Past either, TimeoutError."""

    def __init__(self, connection: socket.socket):
        super().__init__()
        self._connection = connection
        self.deadline: Optional[float] = None
        self.pause: Optional[float] = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        timeout = self.pause
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the client took too long")
            timeout = left if timeout is None else min(timeout, left)
        self._connection.settimeout(timeout)
        try:
            return self._connection.recv_into(buffer)
        finally:
            self._connection.settimeout(None)   # writes are not bounded by the read's limit


class _ChunkedBody:
    """A chunked request body, decoded for the app as other WSGI servers do: hexadecimal
    sizes, CRLF after each chunk, trailers skipped. Malformed framing is a ValueError."""

    def __init__(self, stream: Any):
        self._stream, self._left, self._ended = stream, 0, False

    def read(self, size: int = -1) -> bytes:
        parts: List[bytes] = []
        wanted = size if size is not None and size >= 0 else float("inf")
        while wanted > 0 and not self._ended:
            if self._left == 0 and not self._next_chunk():
                break
            part = self._stream.read(int(min(self._left, wanted)))
            if not part:
                raise ValueError("it ended inside a chunk")
            parts.append(part)
            self._left -= len(part)
            wanted -= len(part)
            if self._left == 0 and self._stream.read(2) != b"\r\n":
                raise ValueError("a chunk is not followed by CRLF")
        return b"".join(parts)

    def _next_chunk(self) -> bool:
        line = self._stream.readline(1026)
        size = line.split(b";", 1)[0].strip()
        if not line.endswith(b"\n") or not re.fullmatch(rb"[0-9A-Fa-f]{1,15}", size):
            raise ValueError(f"a chunk size is not a hexadecimal number: {line[:20]!r}")
        self._left = int(size, 16)
        if self._left == 0:
            self._ended = True
            for _ in range(100):   # trailer fields, up to the empty line
                if self._stream.readline(8192).strip() == b"":
                    break
        return not self._ended


class _GuardedWriter:
    """The connection's writes, each whole and one at a time, so that a shutdown can end a
    reply between two of them; after ``cut``, a write is a BrokenPipeError, as if the
    client had left (the app then closes the reply). After ``hold()``, writes are kept until
    the next ``flush()`` and sent as one: wsgiref writes a reply's status line, date, server
    name, header fields and first body bytes one by one, five system calls and, on a network,
    five small packets (a whole reply is now one send; a stream's head leaves with its first
    chunk)."""

    def __init__(self, connection: socket.socket):
        self._connection = connection
        self.lock = threading.Lock()
        self.written = 0   # the bytes sent, not those held
        self.cut = False
        self.closed = False
        self._held: Optional[List[bytes]] = None

    def hold(self) -> None:
        if self._held is None:
            self._held = []

    def write(self, data: bytes) -> int:
        if self._held is not None:
            self._held.append(data)
        else:
            self._send(data)
        return len(data)

    def flush(self) -> None:
        held, self._held = self._held, None
        if held:
            self._send(b"".join(held))

    def _send(self, data: bytes) -> None:
        with self.lock:
            if self.cut:
                raise BrokenPipeError("the server cut this reply short")
            self._connection.sendall(data)
            self.written += len(data)

    def close(self) -> None:
        self.closed = True


class _RequestHandler(ServerHandler):
    """wsgiref's handler of one request, without the process's environment in the request's
    environ: wsgiref copies every variable in (a CGI habit), so each request would carry the
    server's secrets (the LLM's key, the state secret) where any code that shows an environ
    shows them, and every look over the environ would walk past them."""

    os_environ: Mapping[str, str] = MappingProxyType({})

    def send_headers(self) -> None:
        self.stdout.hold()   # the head goes out with the first body bytes: wsgiref flushes after writing them
        super().send_headers()

    def finish_content(self) -> None:
        super().finish_content()
        self.stdout.flush()   # a reply with no body: its head alone


class _LoggingHandler(WSGIRequestHandler):
    """One connection: one request (HTTP/1.0), its framing checked before the app runs (two
    Content-Length fields, or one with Transfer-Encoding, are refused: the way requests are
    smuggled past a proxy), and every error it answers itself in the protocol's own form."""
    # A stream's chunks are small writes: with Nagle's algorithm each would wait for the
    # client to acknowledge the one before, which a client may delay by up to 200 ms.
    disable_nagle_algorithm = True

    def setup(self) -> None:
        super().setup()
        self._reader = _SocketReader(self.connection)
        self.rfile.close()
        self.rfile = io.BufferedReader(self._reader)
        self.wfile = _GuardedWriter(self.connection)
        self._ending = StreamEnding()

    def handle(self) -> None:
        self.server.track(self, True)   # type: ignore[attr-defined]
        try:
            self._handle()
        except (TimeoutError, socket.timeout):   # the request line or header fields took too long
            with contextlib.suppress(OSError):
                self.send_error(408, None, "The request took too long to arrive; the connection is closed.")
        except ConnectionError:
            self.close_connection = True
        finally:
            self.server.track(self, False)   # type: ignore[attr-defined]

    def cut_short(self, message: str) -> None:
        """End this request's reply now, from another thread (a shutdown): a 503 in the
        protocol's form if nothing was sent yet, the protocol's last events if it is a stream
        (StreamEnding), then close the connection."""
        writer = self.wfile
        if writer.lock.acquire(timeout=1.0):   # a client that reads nothing holds it: just close
            try:
                if not writer.cut:
                    writer.cut = True
                    self.connection.settimeout(1.0)
                    self.connection.sendall(self._last_bytes(message, writer.written))
            except OSError:
                pass
            finally:
                writer.lock.release()
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def _last_bytes(self, message: str, written: int) -> bytes:
        if not written:
            body = edge_error_body(self.path or "", ServerBusyError(message, code="server_shutting_down"))
            return (b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        return self._ending.end(message) if self._ending.end is not None else b""

    def _handle(self) -> None:
        limits: ServerLimits = self.server.limits   # type: ignore[attr-defined]
        self.command, self.requestline, self.path, self.request_version = "", "", "", "HTTP/1.0"   # until read
        self._reader.deadline = time.monotonic() + limits.request_line_seconds
        self.raw_requestline = self.rfile.readline(65537)
        self._reader.deadline = time.monotonic() + limits.header_seconds
        if len(self.raw_requestline) > 65536:
            self.requestline, self.request_version, self.command = "", "", ""
            self.send_error(414, "URI Too Long", "The request line is over 65536 bytes.")
            return
        if not self.parse_request():   # an error was answered, or nothing was asked
            return
        problem = self._framing_problem()
        if problem:
            self.send_error(400, "Bad Request", problem)
            return
        self._reader.deadline, self._reader.pause = None, limits.body_pause_seconds
        stdin = _ChunkedBody(self.rfile) if "Transfer-Encoding" in self.headers else self.rfile
        handler = _RequestHandler(stdin, self.wfile, self.get_stderr(), self.get_environ(), multithread=False)
        handler.request_handler = self
        handler.run(self.server.get_app())

    def _framing_problem(self) -> str:
        lengths = self.headers.get_all("Content-Length") or []
        codings = self.headers.get_all("Transfer-Encoding") or []
        if len(lengths) > 1:
            return "The request has more than one Content-Length field."
        if len(codings) > 1:
            return "The request has more than one Transfer-Encoding field."
        if lengths and codings:
            return "Send Content-Length or Transfer-Encoding: chunked, not both."
        return ""

    def send_error(self, code: int, message: Optional[str] = None, explain: Optional[str] = None) -> None:
        """What http.server answers itself (a request line it cannot parse, a header line over
        64 KiB or more than 100 fields), as an OpenAI error object, or a JSON-RPC error on /mcp."""
        if code == 431:   # http.client's words name its own limits, not what to change
            explain = "The request's header fields are too large (a line over 64 KiB, or over 100 fields)."
        error = HTTP_STATUS_ERRORS.get(code, RequestError)(explain or message or "Bad request.")
        error.status = code
        body = edge_error_body(getattr(self, "path", "") or "", error)
        self.close_connection = True
        if getattr(self, "request_version", "HTTP/0.9") == "HTTP/0.9":   # a line it could not read: headers anyway
            self.request_version = "HTTP/1.0"
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        if getattr(self, "command", "") != "HEAD":
            self.wfile.write(body)

    def get_environ(self) -> Dict[str, Any]:
        environ = super().get_environ()
        environ[CONNECTION_ENVIRON_KEY] = self.connection   # to notice a client that hung up
        environ[ENDING_ENVIRON_KEY] = self._ending
        return environ

    def log_message(self, format: str, *args: Any) -> None:   # the app logs each request itself
        log.debug("%s %s", self.address_string(), format % args)

    def address_string(self) -> str:   # no reverse DNS lookups
        return self.client_address[0]


def create_server(app: Callable[..., Any], host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
                  limits: ServerLimits = ServerLimits()) -> WSGIServer:
    """A threaded WSGI server for ``app``; ``port=0`` picks a free port (``server.server_port``).
    ``limits`` bound slow clients and open connections (ServerLimits)."""
    server = _ThreadingWSGIServer((host, port), _LoggingHandler, limits=limits)
    server.set_app(app)
    return server


def server_limits(arguments: argparse.Namespace) -> ServerLimits:
    """The built-in server's limits on slow clients and open connections, from the flags."""
    return ServerLimits(request_line_seconds=arguments.request_line_timeout, header_seconds=arguments.header_timeout,
                        body_pause_seconds=arguments.body_timeout, max_connections=arguments.max_connections)


class AppFromEnvironment:
    """A WSGI app that is ``make_app()`` (the COZYOPENAI_* variables), made on its first
    request, once: so ``gunicorn cozyopenai:app`` works, while importing the module or
    looking at ``cozyopenai.app`` does nothing. A setting it cannot start with is logged and
    answered with a 503 OpenAI error; ``make_app()`` itself reports it at start-up instead."""

    def __init__(self) -> None:
        self._app: Optional[Callable[..., Any]] = None
        self._lock = threading.Lock()

    def __call__(self, environ: Dict[str, Any], start_response: Callable[..., Any]) -> Any:
        if self._app is None:
            with self._lock:
                if self._app is None:
                    self._app = self._make()
        return self._app(environ, start_response)

    @staticmethod
    def _make() -> Callable[..., Any]:
        try:
            return make_app()
        except (WorkflowFileError, ConfigError) as exc:
            log.error("cozyopenai cannot start: %s", exc.message)
            body = json.dumps(CozyError(f"The server is not configured: {exc.message}").to_openai()).encode()

            def unconfigured(environ: Dict[str, Any], start_response: Callable[..., Any]) -> List[bytes]:
                start_response("503 Service Unavailable", [("Content-Type", "application/json"),
                                                           ("Content-Length", str(len(body)))])
                return [body]
            return unconfigured


app = AppFromEnvironment()   # for `gunicorn cozyopenai:app`; builds nothing until its first request


def main(argv: Optional[Sequence[str]] = None) -> int:
    if MISSING_PACKAGE is not None:
        print(f"cozyopenai: the package {MISSING_PACKAGE.name or MISSING_PACKAGE} is missing; install what it needs "
              "with: pip install -r requirements.txt", file=sys.stderr)
        return 2
    arguments = parse_arguments(argv, os.environ)
    logging.basicConfig(level=arguments.log_level.upper(), handlers=[log_line_handler()])
    # The openai client's HTTP library logs each call's whole URL at INFO, credentials and
    # all, and a line per call besides ours: only its warnings are kept.
    for name in TRANSPORT_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger().level))
    try:
        app = make_app(**_config_from_arguments(arguments))
    except (WorkflowFileError, ConfigError) as exc:
        print(f"cozyopenai: {exc.message}", file=sys.stderr)
        return 2
    service = app.config["cozyopenai.service"]
    server = None
    if arguments.server == "default":   # listen first: a taken port is a refusal like the others
        try:
            server = create_server(app, arguments.host, arguments.port, server_limits(arguments))
        except OSError as exc:   # most often: the port is taken
            print(f"cozyopenai: cannot listen on {arguments.host}:{arguments.port}: {exc.strerror or exc}",
                  file=sys.stderr)
            return 2
    log.info("%s", startup_summary(service))
    if not arguments.api_key and not _is_loopback(arguments.host):
        log.warning("listening on %s with no --api-key: anyone who can reach it can use the models",
                    arguments.host)
    if service.llm is not None:
        threading.Thread(target=_warn_if_unreachable, args=(service.llm,), daemon=True).start()
    if server is None:
        return _run_with_bottle_adapter(app, arguments)
    log.info("serving on http://%s:%d/openai (a page for people at http://%s:%d/)", arguments.host,
             server.server_port, arguments.host, server.server_port)
    stopping, hurry = threading.Event(), threading.Event()

    def on_signal(number: int, frame: Any) -> None:
        if stopping.is_set():   # a second Ctrl-C: cut what still runs now
            hurry.set()
            return
        stopping.set()
        log.info("%s: shutting down; running turns have %g s to finish", signal.Signals(number).name,
                 arguments.shutdown_grace)
        threading.Thread(target=server.shutdown, daemon=True).start()   # it waits for serve_forever
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, on_signal)
    try:
        server.serve_forever(poll_interval=0.1)
    finally:
        cut = server.drain(arguments.shutdown_grace, hurry=hurry)   # type: ignore[attr-defined]
    log.info("stopped%s", f"; {cut} replies cut short" if cut else ": every reply finished")
    return 0


def startup_summary(service: "Service") -> str:
    """What a server runs with, in one line: version, models and their file, store, LLM, keys."""
    describe = getattr(service.store, "describe", None)
    where = describe() if describe else type(service.store).__name__
    llm = (f"{shown_url(service.llm.settings.base_url)} model {service.llm.settings.model}" if service.llm
           else "none: the simple reader")
    count = len(service.workflows)
    return (f"cozyopenai {__version__}: {count} model{'' if count == 1 else 's'} ({', '.join(service.workflows)}) from "
            f"{service.workflows_source}; store: {where}; LLM: {llm}; API keys: "
            f"{'required' if service.api_keys else 'not required'}")


def _warn_if_unreachable(llm: LLMClient) -> None:
    """One quick look at the LLM's model list, so that an LLM that is down is known at start-up,
    not at the first turn. It only warns: the LLM may come up later."""
    try:
        response = requests.get(llm.settings.base_url.rstrip("/") + "/models", timeout=LLM_CHECK_SECONDS,
                                headers={"Authorization": f"Bearer {llm.settings.api_key or 'unused'}"})
        problem = f"HTTP {response.status_code}" if response.status_code >= 400 else ""
    except requests.RequestException as exc:
        problem = type(exc).__name__
    if problem:
        log.warning("the LLM at %s did not answer GET /models (%s); until it does, turns use the simple reader "
                    "and llm nodes their fallback", llm.host, problem)


SERVER_OPTIONS: Mapping[str, Callable[[argparse.Namespace], dict]] = MappingProxyType({
    # Bottle's adapter name → its options. Threads matter: every open stream holds one.
    "gunicorn": lambda a: {"workers": a.workers, "threads": a.threads, "worker_class": "gthread"},
    "waitress": lambda a: {"threads": a.threads, "connection_limit": 4 * a.threads},   # its default is 100
    "cheroot": lambda a: {"numthreads": a.threads, "request_queue_size": LISTEN_BACKLOG},   # its default is 5
})


def _run_with_bottle_adapter(app: bottle.Bottle, arguments: argparse.Namespace) -> int:
    """--server NAME: one of Bottle's server adapters, if its package is installed."""
    if arguments.server not in bottle.server_names:
        print(f"cozyopenai: unknown --server {arguments.server!r}; try default, "
              f"{', '.join(sorted(SERVER_OPTIONS))}", file=sys.stderr)
        return 2
    if arguments.server in SERVER_OPTIONS and importlib.util.find_spec(arguments.server) is None:
        print(f"cozyopenai: --server {arguments.server} is not installed: pip install {arguments.server}",
              file=sys.stderr)
        return 2
    options = SERVER_OPTIONS.get(arguments.server, lambda a: {})(arguments)
    log.info("serving on http://%s:%d/openai with %s", arguments.host, arguments.port, arguments.server)
    try:
        bottle.run(app, server=arguments.server, host=arguments.host, port=arguments.port, quiet=True, **options)
    except ImportError as exc:
        print(f"cozyopenai: --server {arguments.server} is not installed ({exc.name}): "
              f"pip install {exc.name or arguments.server}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
