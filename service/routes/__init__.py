"""Thin HTTP routers: parse, call `serving/`, return."""
