"""Errors that reach the user as one line naming the culprit (file, tensor path, flag)."""


class RuntimeInputError(ValueError):
    """Bad user input: a config, checkpoint file, flag or request. The message is complete."""


class ConfigError(RuntimeInputError):
    """A config file or preset is unknown, has unknown keys or impossible values."""


class CheckpointError(RuntimeInputError):
    """A checkpoint file is missing, truncated, foreign or does not match the model."""


class ShardingError(RuntimeInputError):
    """A parameter matches no partition rule or several, or a mesh does not fit."""


class RequestError(RuntimeInputError):
    """A generation request cannot be served (prompt too long, bad sampling settings)."""


# Problems listed in one error message; past this many the rest are counted ("... and N more"):
# a hostile file with 200,000 junk tensor names gets a screenful, not 200,000 lines.
MAX_LISTED = 20


def problem_report(summary: str, problems: list[str],
                   error: type[RuntimeInputError] = RuntimeInputError) -> RuntimeInputError:
    """One error for a list of problems: `summary: problem` for one, else the summary with the
    count and at most MAX_LISTED problems, one per indented line."""
    if len(problems) == 1:
        return error(f"{summary}: {problems[0]}")
    shown = problems[:MAX_LISTED]
    more = [f"... and {len(problems) - len(shown)} more"] if len(problems) > len(shown) else []
    return error("\n  ".join([f"{summary} ({len(problems)} problems):"] + shown + more))


def listed(names, limit: int = MAX_LISTED) -> str:
    """names joined with ", ", at most `limit` of them, then "... and N more"."""
    names = list(names)
    shown = ", ".join(str(name) for name in names[:limit])
    return shown + (f", ... and {len(names) - limit} more" if len(names) > limit else "")
