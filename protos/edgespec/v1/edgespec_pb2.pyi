from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Sampler(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SAMPLER_UNSPECIFIED: _ClassVar[Sampler]
    SAMPLER_COUPLED: _ClassVar[Sampler]
    SAMPLER_REJECTION: _ClassVar[Sampler]
SAMPLER_UNSPECIFIED: Sampler
SAMPLER_COUPLED: Sampler
SAMPLER_REJECTION: Sampler

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_k", "top_p", "max_new_tokens", "seed", "stop_token_ids", "sampler")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLER_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_k: int
    top_p: float
    max_new_tokens: int
    seed: int
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampler: Sampler
    def __init__(self, temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., max_new_tokens: _Optional[int] = ..., seed: _Optional[int] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., sampler: _Optional[_Union[Sampler, str]] = ...) -> None: ...

class OpenSessionRequest(_message.Message):
    __slots__ = ("prefix_ids", "params", "model_id", "generated", "next_seq")
    PREFIX_IDS_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    GENERATED_FIELD_NUMBER: _ClassVar[int]
    NEXT_SEQ_FIELD_NUMBER: _ClassVar[int]
    prefix_ids: _containers.RepeatedScalarFieldContainer[int]
    params: SamplingParams
    model_id: str
    generated: int
    next_seq: int
    def __init__(self, prefix_ids: _Optional[_Iterable[int]] = ..., params: _Optional[_Union[SamplingParams, _Mapping]] = ..., model_id: _Optional[str] = ..., generated: _Optional[int] = ..., next_seq: _Optional[int] = ...) -> None: ...

class OpenSessionResponse(_message.Message):
    __slots__ = ("session_id", "committed_len", "max_block_tokens", "vocab_size", "model_id", "prefill_ms", "compute_profile", "tree_blocks", "idle_forward_ms", "block_alternatives")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_LEN_FIELD_NUMBER: _ClassVar[int]
    MAX_BLOCK_TOKENS_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    PREFILL_MS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_PROFILE_FIELD_NUMBER: _ClassVar[int]
    TREE_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    IDLE_FORWARD_MS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_ALTERNATIVES_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    committed_len: int
    max_block_tokens: int
    vocab_size: int
    model_id: str
    prefill_ms: float
    compute_profile: str
    tree_blocks: bool
    idle_forward_ms: float
    block_alternatives: bool
    def __init__(self, session_id: _Optional[str] = ..., committed_len: _Optional[int] = ..., max_block_tokens: _Optional[int] = ..., vocab_size: _Optional[int] = ..., model_id: _Optional[str] = ..., prefill_ms: _Optional[float] = ..., compute_profile: _Optional[str] = ..., tree_blocks: _Optional[bool] = ..., idle_forward_ms: _Optional[float] = ..., block_alternatives: _Optional[bool] = ...) -> None: ...

class CloseSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class CloseSessionResponse(_message.Message):
    __slots__ = ("existed",)
    EXISTED_FIELD_NUMBER: _ClassVar[int]
    existed: bool
    def __init__(self, existed: _Optional[bool] = ...) -> None: ...

class DraftProbs(_message.Message):
    __slots__ = ("dense", "sparse")
    DENSE_FIELD_NUMBER: _ClassVar[int]
    SPARSE_FIELD_NUMBER: _ClassVar[int]
    dense: DenseProbs
    sparse: SparseProbs
    def __init__(self, dense: _Optional[_Union[DenseProbs, _Mapping]] = ..., sparse: _Optional[_Union[SparseProbs, _Mapping]] = ...) -> None: ...

class DenseProbs(_message.Message):
    __slots__ = ("probs",)
    PROBS_FIELD_NUMBER: _ClassVar[int]
    probs: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, probs: _Optional[_Iterable[float]] = ...) -> None: ...

class SparseProbs(_message.Message):
    __slots__ = ("row_lengths", "ids", "probs")
    ROW_LENGTHS_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    PROBS_FIELD_NUMBER: _ClassVar[int]
    row_lengths: _containers.RepeatedScalarFieldContainer[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    probs: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, row_lengths: _Optional[_Iterable[int]] = ..., ids: _Optional[_Iterable[int]] = ..., probs: _Optional[_Iterable[float]] = ...) -> None: ...

class DraftBlock(_message.Message):
    __slots__ = ("session_id", "seq", "base_len", "tokens", "probs", "decode_tokens", "anchor_token", "parents", "anchor_prefix", "alternatives")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    BASE_LEN_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    PROBS_FIELD_NUMBER: _ClassVar[int]
    DECODE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ANCHOR_TOKEN_FIELD_NUMBER: _ClassVar[int]
    PARENTS_FIELD_NUMBER: _ClassVar[int]
    ANCHOR_PREFIX_FIELD_NUMBER: _ClassVar[int]
    ALTERNATIVES_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    seq: int
    base_len: int
    tokens: _containers.RepeatedScalarFieldContainer[int]
    probs: DraftProbs
    decode_tokens: int
    anchor_token: int
    parents: _containers.RepeatedScalarFieldContainer[int]
    anchor_prefix: _containers.RepeatedScalarFieldContainer[int]
    alternatives: _containers.RepeatedCompositeFieldContainer[DraftBlock]
    def __init__(self, session_id: _Optional[str] = ..., seq: _Optional[int] = ..., base_len: _Optional[int] = ..., tokens: _Optional[_Iterable[int]] = ..., probs: _Optional[_Union[DraftProbs, _Mapping]] = ..., decode_tokens: _Optional[int] = ..., anchor_token: _Optional[int] = ..., parents: _Optional[_Iterable[int]] = ..., anchor_prefix: _Optional[_Iterable[int]] = ..., alternatives: _Optional[_Iterable[_Union[DraftBlock, _Mapping]]] = ...) -> None: ...

class Verdict(_message.Message):
    __slots__ = ("seq", "outcome", "accepted", "token", "is_bonus", "committed_len", "verify_ms", "queue_ms", "more", "path", "alternative")
    class Outcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        OUTCOME_UNSPECIFIED: _ClassVar[Verdict.Outcome]
        APPLIED: _ClassVar[Verdict.Outcome]
        REPLAYED: _ClassVar[Verdict.Outcome]
        STALE: _ClassVar[Verdict.Outcome]
    OUTCOME_UNSPECIFIED: Verdict.Outcome
    APPLIED: Verdict.Outcome
    REPLAYED: Verdict.Outcome
    STALE: Verdict.Outcome
    SEQ_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    IS_BONUS_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_LEN_FIELD_NUMBER: _ClassVar[int]
    VERIFY_MS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    MORE_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    ALTERNATIVE_FIELD_NUMBER: _ClassVar[int]
    seq: int
    outcome: Verdict.Outcome
    accepted: int
    token: int
    is_bonus: bool
    committed_len: int
    verify_ms: float
    queue_ms: float
    more: bool
    path: _containers.RepeatedScalarFieldContainer[int]
    alternative: int
    def __init__(self, seq: _Optional[int] = ..., outcome: _Optional[_Union[Verdict.Outcome, str]] = ..., accepted: _Optional[int] = ..., token: _Optional[int] = ..., is_bonus: _Optional[bool] = ..., committed_len: _Optional[int] = ..., verify_ms: _Optional[float] = ..., queue_ms: _Optional[float] = ..., more: _Optional[bool] = ..., path: _Optional[_Iterable[int]] = ..., alternative: _Optional[int] = ...) -> None: ...

class TokenIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("prompt", "prompt_ids", "params", "policy", "draft_tokens", "pipelined")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_IDS_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    DRAFT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PIPELINED_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    prompt_ids: TokenIds
    params: SamplingParams
    policy: str
    draft_tokens: int
    pipelined: bool
    def __init__(self, prompt: _Optional[str] = ..., prompt_ids: _Optional[_Union[TokenIds, _Mapping]] = ..., params: _Optional[_Union[SamplingParams, _Mapping]] = ..., policy: _Optional[str] = ..., draft_tokens: _Optional[int] = ..., pipelined: _Optional[bool] = ...) -> None: ...

class GenerateStats(_message.Message):
    __slots__ = ("rounds", "drafted", "accepted", "drafted_per_position", "accepted_per_position", "draft_lengths", "rtt_ms_mean", "time_to_first_token_ms", "time_per_output_token_ms", "bytes_sent", "bytes_received", "reconnects", "verifier", "pipeline_hits", "pipeline_misses", "cloud_only_tokens")
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    DRAFTED_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    DRAFTED_PER_POSITION_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_PER_POSITION_FIELD_NUMBER: _ClassVar[int]
    DRAFT_LENGTHS_FIELD_NUMBER: _ClassVar[int]
    RTT_MS_MEAN_FIELD_NUMBER: _ClassVar[int]
    TIME_TO_FIRST_TOKEN_MS_FIELD_NUMBER: _ClassVar[int]
    TIME_PER_OUTPUT_TOKEN_MS_FIELD_NUMBER: _ClassVar[int]
    BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    RECONNECTS_FIELD_NUMBER: _ClassVar[int]
    VERIFIER_FIELD_NUMBER: _ClassVar[int]
    PIPELINE_HITS_FIELD_NUMBER: _ClassVar[int]
    PIPELINE_MISSES_FIELD_NUMBER: _ClassVar[int]
    CLOUD_ONLY_TOKENS_FIELD_NUMBER: _ClassVar[int]
    rounds: int
    drafted: int
    accepted: int
    drafted_per_position: _containers.RepeatedScalarFieldContainer[int]
    accepted_per_position: _containers.RepeatedScalarFieldContainer[int]
    draft_lengths: _containers.RepeatedScalarFieldContainer[int]
    rtt_ms_mean: float
    time_to_first_token_ms: float
    time_per_output_token_ms: float
    bytes_sent: int
    bytes_received: int
    reconnects: int
    verifier: str
    pipeline_hits: int
    pipeline_misses: int
    cloud_only_tokens: int
    def __init__(self, rounds: _Optional[int] = ..., drafted: _Optional[int] = ..., accepted: _Optional[int] = ..., drafted_per_position: _Optional[_Iterable[int]] = ..., accepted_per_position: _Optional[_Iterable[int]] = ..., draft_lengths: _Optional[_Iterable[int]] = ..., rtt_ms_mean: _Optional[float] = ..., time_to_first_token_ms: _Optional[float] = ..., time_per_output_token_ms: _Optional[float] = ..., bytes_sent: _Optional[int] = ..., bytes_received: _Optional[int] = ..., reconnects: _Optional[int] = ..., verifier: _Optional[str] = ..., pipeline_hits: _Optional[int] = ..., pipeline_misses: _Optional[int] = ..., cloud_only_tokens: _Optional[int] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("tokens", "summary", "text")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    tokens: TokenIds
    summary: Summary
    text: str
    def __init__(self, tokens: _Optional[_Union[TokenIds, _Mapping]] = ..., summary: _Optional[_Union[Summary, _Mapping]] = ..., text: _Optional[str] = ...) -> None: ...

class Summary(_message.Message):
    __slots__ = ("finish_reason", "token_ids", "text", "stats", "seed")
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    finish_reason: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    stats: GenerateStats
    seed: int
    def __init__(self, finish_reason: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ..., stats: _Optional[_Union[GenerateStats, _Mapping]] = ..., seed: _Optional[int] = ...) -> None: ...
