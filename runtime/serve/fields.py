"""HTTP fields -> runtime requests, and every error -> a JSON body {"error": one line, "status": code}.

A generate request is JSON (concept ids) or a multipart form (concept ids, or image and mask pairs
uploaded inline). Several concepts compose in one prompt (the c-th placeholder names concept c):
`concept_id` and `lambda` take one value or a list (one lambda applies to every concept). The fields
are checked here for their HTTP shape only (types, names, counts, lengths); every value is checked by the runtime (GenerationSettings.validate, Request.validate: the
allowed ranges, finite numbers; the placeholder; the bundle's sizes) and its EliteError message
becomes the 400 body. `build_requests` is the one place HTTP fields become Requests.
"""
from __future__ import annotations

import base64
import json
from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator

from elite_export.errors import EliteError
from elite_export.runtime.requests import (DEFAULT_GUIDANCE, DEFAULT_LAMBDA, DEFAULT_STEPS, GUIDANCE_RANGE,
                                           LAMBDA_RANGE, MODES, STEPS_RANGE, WORD_CHOICES, GenerationSettings,
                                           Request)
from elite_export.runtime.schedulers import DEFAULT_SCHEDULER, SCHEDULER_NAMES

MAX_PROMPT_CHARS = 2000
CONCEPT_ID = r"^[0-9a-f]{32}$"
MAX_CONCEPTS = 8  # per request, for the HTTP shape; the bundle's --concepts range is the runtime's check

# EliteError and the HTTP errors below -> status. The runtime's messages are user errors: 400 unless
# a finer code says more (the lead's validation work can map its own error kinds here).
USER_ERROR_STATUS = 400


class HttpError(Exception):
    """An error with an HTTP status (404 unknown concept, 413 too large, 503 queue full, 504 timeout...)."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def error_body(status: int, message: str) -> dict:
    return {"error": " ".join(str(message).split()), "status": status}


def status_of(exc: BaseException) -> int:
    if isinstance(exc, HttpError):
        return exc.status
    if isinstance(exc, ValidationError):
        return 422
    if isinstance(exc, EliteError):
        return USER_ERROR_STATUS
    return 500


def one_line(exc: BaseException) -> str:
    """The message a client sees: the runtime's own line, or the first problem with the fields."""
    if isinstance(exc, HttpError):
        return exc.message
    if isinstance(exc, ValidationError):
        errors = exc.errors(include_url=False)
        e = errors[0]
        where = ".".join(str(x) for x in e["loc"]) or "body"
        if e["type"] == "extra_forbidden":
            text = f"unknown field {where!r}"
        else:
            got = e.get("input")
            r = repr(got)
            shown = f" (got {r if len(r) <= 60 else r[:56] + ' ...'})" if isinstance(got, (str, int, float)) else ""
            text = f"{where}: {e['msg']}{shown}"
        return text + (f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else "")
    if isinstance(exc, EliteError):
        return str(exc)
    return f"internal error ({type(exc).__name__}); the service logged it"


Prompt = Annotated[str, StringConstraints(min_length=1, max_length=MAX_PROMPT_CHARS)]
Finite = Annotated[float, Field(allow_inf_nan=False)]


class GenerateFields(BaseModel):
    """The fields of POST /v1/generate (JSON body or multipart form fields of the same names)."""
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    prompt: list[Prompt] = Field(min_length=1, max_length=16,
                                 description="Prompt(s) with the placeholder words, e.g. 'a photo of a S' "
                                             "(several concepts: 'a S and a V on the beach').")
    concept_id: Optional[list[Annotated[str, StringConstraints(pattern=CONCEPT_ID)]]] = Field(
        None, min_length=1, max_length=MAX_CONCEPTS,
        description="From POST /v1/encode: one id, or a list (concept c is the prompt's c-th placeholder); "
                    "or upload `image` and `mask` (multipart; repeat the pair for several) instead.")
    mode: Literal.__getitem__(MODES) = "local"  # type: ignore[valid-type]
    words: Literal.__getitem__(WORD_CHOICES) = "all"  # type: ignore[valid-type]
    lam: Union[float, list[float]] = Field(
        DEFAULT_LAMBDA, alias="lambda",
        description=f"Local branch weight, {LAMBDA_RANGE[0]:g}..{LAMBDA_RANGE[1]:g}: one for every concept, or one "
                    "per concept.")
    scheduler: Literal.__getitem__(SCHEDULER_NAMES) = DEFAULT_SCHEDULER  # type: ignore[valid-type]
    steps: int = Field(DEFAULT_STEPS, description=f"{STEPS_RANGE[0]}..{STEPS_RANGE[1]}.")
    guidance: float = Field(DEFAULT_GUIDANCE, description=f"{GUIDANCE_RANGE[0]:g}..{GUIDANCE_RANGE[1]:g}.")
    seed: int = Field(0, description="Image k of the request gets seed + k (as elite-run).")
    height: int = Field(512, description="Pixels, a multiple of 64 within the bundle's range.")
    width: int = Field(512, description="Pixels, a multiple of 64 within the bundle's range.")
    n: int = Field(1, ge=1, le=16, description="Images per prompt.")
    timeout_s: Optional[Finite] = Field(None, gt=0, description="This request's deadline (at most --timeout-s).")
    format: Optional[Literal["png", "json"]] = Field(
        None, description="png (one image only) or json (base64 PNGs); default: png for one image, json for more.")

    @field_validator("prompt", "concept_id", mode="before")
    @classmethod
    def _one_or_list(cls, v):
        return [v] if isinstance(v, str) else v

    @field_validator("lam", mode="before")
    @classmethod
    def _form_lambda(cls, v):  # a form sends strings: one, or several when repeated
        return [float(x) for x in v] if isinstance(v, list) and all(isinstance(x, str) for x in v) else v


def build_requests(fields: GenerateFields, concepts: list) -> tuple[list[Request], GenerationSettings]:
    """The one place HTTP fields become runtime requests: n images per prompt, prompt after prompt;
    image k gets seed + k, so the same prompts given to elite-run (each repeated n times) with
    --seed SEED give the same images."""
    settings = GenerationSettings(scheduler=fields.scheduler, steps=fields.steps, guidance=fields.guidance,
                                  height=fields.height, width=fields.width)
    prompts = [p for p in fields.prompt for _ in range(fields.n)]
    requests = [Request(concepts, p, fields.seed + k, fields.mode, fields.words, fields.lam)
                for k, p in enumerate(prompts)]
    return requests, settings


def batch_key(settings: GenerationSettings) -> tuple:
    """What one pipeline call shares: rows with equal keys may run in one batch."""
    return tuple(sorted(settings.to_dict().items()))


# -- reading bodies -------------------------------------------------------------------------------
Upload = tuple[str, bytes]  # (file name, bytes)


async def read_body(request, max_bytes: int) -> bytes:
    """The whole body, refused with 413 past max_bytes (by Content-Length, or while it streams)."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_bytes:
        raise HttpError(413, f"request body of {int(length):,} bytes is more than the {max_bytes:,} allowed "
                             "(--max-upload-mb)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise HttpError(413, f"request body is more than the {max_bytes:,} bytes allowed (--max-upload-mb)")
        chunks.append(chunk)
    request._body = body = b"".join(chunks)  # Starlette's cache: form() parses it from here
    return body


async def read_fields(request, max_bytes: int, files: tuple[str, ...],
                      max_files: int = 1) -> tuple[dict, dict[str, list[Upload]]]:
    """JSON object or multipart/urlencoded form -> (fields, uploads: up to max_files per file field, in
    the order sent). Uploads only in forms; a repeated form field becomes a list."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = await read_body(request, max_bytes)
    if kind == "application/json":
        try:
            data = json.loads(body or b"null")
        except (ValueError, UnicodeDecodeError) as e:
            raise HttpError(400, f"the body is not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise HttpError(422, "the JSON body must be an object of fields")
        return data, {}
    if kind not in ("multipart/form-data", "application/x-www-form-urlencoded"):
        raise HttpError(415, f"send application/json or multipart/form-data, not {kind or 'no content type'!r}")
    try:
        form = await request.form(max_files=len(files) * max_files, max_fields=64, max_part_size=max_bytes)
    except Exception as e:  # noqa: BLE001 - the multipart parser's own errors on malformed bodies
        raise HttpError(400, f"malformed form body ({' '.join(str(e).split())[:200]})") from None
    data: dict = {}
    uploads: dict[str, list[Upload]] = {}
    for key in form.keys():
        values = form.getlist(key)
        if key in files:
            if any(isinstance(v, str) for v in values) or len(values) > max_files:
                raise HttpError(422, f"{key!r} must be one uploaded file" + (
                    f" per concept (at most {max_files})" if max_files > 1 else ""))
            uploads[key] = [(v.filename or key, await v.read()) for v in values]
        elif any(not isinstance(v, str) for v in values):
            raise HttpError(422, f"{key!r} must be a form field, not a file")
        else:
            data[key] = values if key == "prompt" else values[0] if len(values) == 1 else values
    return data, uploads


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def json_schema_body(model: type[BaseModel], files: dict[str, str]) -> dict:
    """OpenAPI requestBody: the model as JSON, and as a form with the file fields added."""
    schema = model.model_json_schema(by_alias=True)
    form = {**schema, "properties": {**schema["properties"],
                                     **{k: {"type": "string", "format": "binary", "description": d}
                                        for k, d in files.items()}}}
    return {"required": True, "content": {"application/json": {"schema": schema},
                                          "multipart/form-data": {"schema": form}}}

