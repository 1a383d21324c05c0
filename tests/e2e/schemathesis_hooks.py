"""Loaded by schemathesis in the fuzz test (SCHEMATHESIS_HOOKS): a workaround for a tool crash, no hooks.

When a drawn strategy turns out empty, Hypothesis writes its repr, and the repr of a lambda filter parses the
lambda's whole source module with `ast.parse`. Deep inside the request-body strategy of this document that
parse trips CPython 3.11's "AST constructor recursion depth mismatch" SystemError, which schemathesis reports
as a runtime error of the operation (one fresh-clone run in three). The repr only labels the discarded draw,
so lambdas are described by name here and nothing is parsed; generation and checks are unchanged.
"""

from hypothesis.internal import lambda_sources


def _named(f) -> str:
    return f"lambda: <{getattr(f, '__qualname__', 'lambda')}>"


lambda_sources.lambda_description = _named
