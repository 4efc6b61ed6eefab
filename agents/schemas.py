"""Typed data at the graph's seams: plan, opinions, evaluation, review decision, verdict."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class PlannedCall(BaseModel):
    tool: str
    study_id: str
    reason: str  # "proposed by planner LLM" | "required for modality" ...


class Plan(BaseModel):
    calls: list[PlannedCall]
    proposed: list[str] = Field(default_factory=list)  # what the LLM asked for
    rejected: list[str] = Field(default_factory=list)  # proposals the rule refused, with why


class Claim(BaseModel):
    statement: str
    cites: list[str]  # tool-result ids ("ct_analysis:ct") or insight ids ("insight:...")
    valid: bool | None = None  # set by the evaluator: the cited evidence says what the claim says


class Ranked(BaseModel):
    diagnosis: str  # catalogue key
    probability: float


class Opinion(BaseModel):
    agent: str
    model: str
    round: int
    diagnosis: str  # catalogue key
    differential: list[Ranked]
    rationale: list[Claim]
    changed_from: str | None = None  # the agent's previous round answer, if it changed
    images: list[str] = Field(default_factory=list)  # artefact ids of the images a vision model was shown


class RoundRecord(BaseModel):
    round: int
    votes: dict[str, str]  # agent -> diagnosis key
    agree: bool


class ReviewDecision(BaseModel):
    action: Literal["approve", "override", "send_back"]
    diagnosis: str | None = None  # approve: one of the panel's; override: any catalogue disease
    reviewer: str = Field(min_length=1)
    reason: str = ""


class Verdict(BaseModel):
    case_id: str
    diagnosis: str
    diagnosis_name: str
    differential: list[Ranked]
    confidence: float
    rationale: list[Claim]
    tool_failures: list[str]  # "tool:study: error"
    tools_used: list[str]
    agreement_history: list[RoundRecord]
    decided_by: str  # "agents (unanimous, round 1)" | "reviewer: NAME"
    review: ReviewDecision | None = None
    warnings: list[str] = Field(default_factory=list)  # e.g. instruction-like text removed from the case
    citations_valid: float | None = None  # share of rationale claims whose citations hold
