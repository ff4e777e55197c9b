"""Python clients of the nsam service (async and blocking) returning plain dataclasses."""

from nsam.client.client import AsyncClient, Client
from nsam.client.types import (ConsolidationResult, DocumentRead, ExportedMemory, LevelHealth, LevelInfo,
                               MemoryHealth, MemoryInfo, MemoryVersion, Message, NsamError,
                               RememberedFact, Sampling, Session, Token, TurnResult)

__all__ = ["AsyncClient", "Client", "ConsolidationResult", "DocumentRead", "ExportedMemory", "LevelHealth",
           "LevelInfo", "MemoryHealth", "MemoryInfo", "MemoryVersion", "Message", "NsamError",
           "RememberedFact", "Sampling", "Session", "Token", "TurnResult"]
