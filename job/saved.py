"""What ftjob saved and reads back (a data cursor, a checkpoint's rank file or run.json) is input:
validated against a model of the record as strictly as the spec, and refused with exit 2 naming the file
and the key, with --restart as the way on."""

from __future__ import annotations

from typing import Annotated, Any, NoReturn, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from job.errors import UserError
from job.spec import _json_path, echo

SHOWN_PROBLEMS = 5

Count = Annotated[int, Field(ge=0, strict=True)]


class Saved(BaseModel):
    """A record ftjob saved and reads back (a data cursor, a checkpoint's rank file or run.json): input,
    validated with validated(), so a key it does not define is refused."""

    model_config = ConfigDict(extra="forbid")


def refuse(where: str, problem: str) -> NoReturn:
    """End the job with exit 2 (UserError) for something read back from a checkpoint: `where` names the
    file, `problem` the key and what is wrong with it; the message says --restart is the way on."""
    raise UserError(
        f"{where}: {problem}. A checkpoint is input, checked as strictly as the spec: run with --restart "
        "to start over (checkpoints and published outputs are deleted)"
    )


SavedT = TypeVar("SavedT", bound=Saved)


def validated(model: type[SavedT], value: Any, where: str, *at: str | int) -> SavedT:
    """value (read back from `where`, at the keys `at` within it) as the Saved model, else refused with
    the first problems, each naming its key."""
    try:
        return model.model_validate(value)
    except ValidationError as e:
        errors = e.errors()
        problems = [
            f"{_json_path((*at, *error['loc']))}: {error['msg']}"
            + ("" if isinstance(error["input"], dict | list) else f" (got {echo(error['input'])})")
            for error in errors[:SHOWN_PROBLEMS]
        ]
        more = f"; and {len(errors) - SHOWN_PROBLEMS} more" if len(errors) > SHOWN_PROBLEMS else ""
        refuse(where, "not as ftjob writes it: " + "; ".join(problems) + more)
