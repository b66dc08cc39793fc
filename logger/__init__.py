"""Structured logs in dllogger's JSON-lines layout, without depending on dllogger."""
from logger.logger import Logger

__all__ = ['Logger']
