"""How a record becomes text, the same way in training, reference scoring, generation, evaluation, rollouts and the
generative judge: the processor's (or tokenizer's) chat template when it has one, else the plain '<image> question'
prompt (one placeholder per image) and 'prompt answer eos' sequence that the embedded tiny model is trained on.

With a chat template the prompt is the user turn (the images, then the question) plus the assistant header
(add_generation_prompt), and the training sequence is the whole conversation with the answer as the assistant turn;
the prompt must be a prefix of it, which is checked on every record (a template that rewrites earlier turns when a
reply follows cannot be trained on this way, and is refused by name).
"""
from __future__ import annotations


def chat_template_of(processor) -> str | None:
    """The chat template the prompts use: the processor's, else its tokenizer's, else None."""
    tokenizer = getattr(processor, "tokenizer", processor)
    return getattr(processor, "chat_template", None) or getattr(tokenizer, "chat_template", None) or None


class PromptFormat:
    """prompt(question, images, video) and sequence(question, answer, images, video) for one processor, `images` the
    number of images the prompt shows (0: text only), `video` whether it shows a video first.

    use_chat_template: True (the default) uses the processor's chat template when it has one; False always writes
    the plain prompt. image_token: the placeholder of the plain prompt (the processor's own by default)."""

    def __init__(self, processor, use_chat_template: bool = True):
        self.tokenizer = getattr(processor, "tokenizer", processor)
        # Rendered by the tokenizer (text only, no tokenizing): a processor's own apply_chat_template may want parts
        # it lacks here, e.g. SmolVLM's reads its video processor's frame count.
        self.template = chat_template_of(processor) if use_chat_template else None
        self.has_images = hasattr(processor, "image_processor")
        self.image_token = getattr(processor, "image_token", None) or getattr(self.tokenizer, "image_token", None)
        self.video_token = getattr(processor, "video_token", None) or getattr(self.tokenizer, "video_token", None)

    @property
    def chat(self) -> bool:
        return self.template is not None

    def _render(self, messages: list, add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def _user(self, question: str, images: int, video: bool) -> dict:
        if not self.has_images:  # a text-only tokenizer's template: plain string content
            return {"role": "user", "content": question}
        content = [{"type": "video"}] * video + [{"type": "image"}] * images + [{"type": "text", "text": question}]
        return {"role": "user", "content": content}

    def prompt(self, question: str, images: int, video: bool = False) -> str:
        """The text generation continues from (and the prefix whose tokens carry no loss in training)."""
        if self.template is None:
            if video and not self.video_token:
                raise ValueError("a video record, for a processor with no video token (its plain prompt cannot show "
                                 "a video)")
            shown = [self.video_token] * video + ([self.image_token] * images if self.image_token else [])
            return " ".join(shown + [question])
        return self._render([self._user(question, images, video)], add_generation_prompt=True)

    def sequence(self, question: str, answer: str, images: int, video: bool = False) -> str:
        """prompt + answer + the end of the turn: what training scores."""
        prompt = self.prompt(question, images, video)
        if self.template is None:
            return f"{prompt} {answer} {self.tokenizer.eos_token or ''}".rstrip()
        reply = [{"type": "text", "text": answer}] if self.has_images else answer
        text = self._render([self._user(question, images, video), {"role": "assistant", "content": reply}], False)
        if not text.startswith(prompt):
            raise ValueError("the chat template does not write the prompt (user turn + assistant header) as a prefix "
                             "of the conversation with the answer; train with --no-chat-template")
        return text
