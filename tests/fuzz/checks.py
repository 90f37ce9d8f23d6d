"""Schemathesis checks of our own, loaded by the fuzz test (SCHEMATHESIS_HOOKS)."""

import json

import schemathesis


@schemathesis.check
def error_body_is_json_with_error(ctx, response, case):
    """Every 4xx and 5xx answer is {"error": "..."}: clients (tritonclient) read that key."""
    if response.status_code < 400:
        return None
    try:
        body = json.loads(response.content)
    except ValueError:
        raise AssertionError(f"a {response.status_code} answer is not JSON: {response.content[:200]!r}") from None
    if not isinstance(body, dict) or not isinstance(body.get("error"), str):
        raise AssertionError(f'a {response.status_code} answer has no "error" string: {body!r:.200}')
    return None
