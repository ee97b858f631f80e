"""Chat page: the same prompt to the dense and the pruned model side by side, streamed, same seed, tokens/s."""
import streamlit as st

from pruneviz.chat import check_lengths, context_window, prompt_tokens, stream_reply
from pruneviz.ui import components as ui
from pruneviz.ui import state
from pruneviz.ui.compat import ScriptControlException
from pruneviz.ui.work import show_error

loaded = ui.page("Chat", "One prompt, two models: the dense base on the left, the pruned one on the right. Same "
                 "decoding settings and seed, one after the other.")
plan = state.get_plan(loaded)
pruned_model, how = state.compare_model(loaded, plan)

with st.sidebar:
    st.subheader("Decoding", anchor=False)
    max_new = st.slider("Max new tokens", 8, 512, 64, 8, key="chat_max_new",
                        help="A CPU generates a few to a few dozen tokens per second.")
    temperature = st.slider("Temperature", 0.0, 1.5, 0.0, 0.05, key="chat_temperature",
                            help="0 = greedy (deterministic).")
    top_p = st.slider("Top-p", 0.1, 1.0, 0.9, 0.05, key="chat_top_p", disabled=temperature == 0)
    seed = st.number_input("Seed", 0, 2 ** 31 - 1, 0, key="chat_seed")
    system = st.text_input("System prompt (optional)", key="chat_system")
    as_markdown = st.toggle("Render replies as Markdown", key="chat_markdown", value=False,
                            help="Off: model output is shown exactly as generated (a line starting with # stays "
                                 "a # line). On: headings, lists and code are formatted.")

if state.is_exported(loaded):
    st.caption(f"**The exported model itself** (pruned with: {plan.summary()}); its dense base is not loaded, so "
               "there is one column. Load the base with this plan (Prune page) to compare them.")
else:
    st.caption(f"Right side: **{how}** · plan: {'nothing removed' if plan.is_empty() else plan.summary()}")
history = st.session_state["chat"]


def messages(side: str, upto: int) -> list[dict]:
    """The conversation of one side (its own earlier replies) up to turn ``upto``."""
    msgs = [{"role": "system", "content": system}] if system.strip() else []
    for turn in history[:upto]:
        msgs += [{"role": "user", "content": turn["prompt"]}, {"role": "assistant", "content": turn[side] or ""}]
    return msgs


def stats_line(stats) -> str:
    """Reply length and time, the prefill (prompt read, time to the first token) and the decoding speed after it."""
    if not stats:
        return ""
    parts = [f"{stats['tokens']} tokens", f"{stats['seconds']:.1f} s"]
    if stats.get("prefill") is not None:
        parts.append(f"prompt {stats.get('prompt', 0):,} tokens, first token after {stats['prefill']:.2f} s")
    decode = stats.get("decode_tps")
    parts.append(f"**{decode:.1f} tokens/s** decoding" if decode else f"**{stats['tps']:.1f} tokens/s**")
    return " · ".join(parts) + (" · stopped" if stats.get("stopped") else "")


def timing_help(stats) -> str | None:
    """The threading policy the timing ran under (``pruneviz.threads``), for the caption's tooltip."""
    return f"Timed with {stats['threading']}." if stats and stats.get("threading") else None


def show_text(text: str, where=st) -> None:
    """Model or user text: verbatim by default, formatted when "Render replies as Markdown" is on."""
    if as_markdown:
        where.markdown(text)
    else:
        where.text(text)


def write_stream(stream) -> str:
    """Stream chunks into one element (verbatim text, or Markdown when the toggle is on); returns the text."""
    if as_markdown:
        text = st.write_stream(stream)
        return text if isinstance(text, str) else "".join(map(str, text))
    slot, text = st.empty(), ""
    for chunk in stream:
        text += str(chunk)
        slot.text(text)
    return text


AVATARS = {"dense": ":material/deployed_code:", "pruned": ":material/content_cut:"}


def stream_side(model, side: str, turn: dict, msgs: list[dict], col) -> None:
    """Stream one side's reply into ``col``; keeps the partial reply when the user stops or interrupts."""
    with col.chat_message("assistant", avatar=AVATARS[side]):
        stream = stream_reply(model, loaded.tokenizer, msgs, max_new_tokens=int(max_new),
                              temperature=float(temperature), top_p=float(top_p), seed=int(seed))
        try:
            text = write_stream(stream)
        except ScriptControlException:  # Stop (or any other click): keep what was generated
            stream.stop()
            turn[side] = stream.text
            turn[side + "_stats"] = {"tokens": stream.n_generated, "seconds": 0.0, "tps": 0.0, "stopped": True}
            turn["stopped"] = True
            raise
        turn[side] = text
        s = stream.stats
        turn[side + "_stats"] = {"tokens": s.n_tokens, "seconds": s.seconds, "tps": s.tokens_per_s,
                                 "stopped": s.stopped, "prompt": s.prompt_tokens, "prefill": s.prefill_seconds,
                                 "decode_tps": s.decode_tokens_per_s, "threading": s.threading} if s else None
        st.caption(stats_line(turn[side + "_stats"]), help=timing_help(turn[side + "_stats"]))


exported = state.is_exported(loaded)
SIDES = {"dense": (loaded.model, "Exported model" if exported else "Dense")}
if not exported:  # an exported checkpoint is the only model here (its dense base is not loaded)
    SIDES["pruned"] = (pruned_model, "Pruned")
heads = st.columns(len(SIDES), gap="large")
for (_, title), col in zip(SIDES.values(), heads):
    col.markdown(f"#### {title}")


def replies(turn: dict) -> None:
    """One turn: the prompt once, then each side's reply in its column."""
    show_text(turn["prompt"], st.chat_message("user"))
    cols = st.columns(len(SIDES), gap="large")
    for side, col in zip(SIDES, cols):
        if turn.get(side) is None:
            if turn.get("stopped"):
                col.caption("(stopped before this side started)")
            continue
        with col.chat_message("assistant", avatar=AVATARS[side]):
            if turn[side]:
                show_text(turn[side])
            else:
                st.caption("(empty reply)")
            st.caption(stats_line(turn.get(side + "_stats")), help=timing_help(turn.get(side + "_stats")))


for turn in history:
    replies(turn)

window = context_window(loaded.model)
if window:
    used = prompt_tokens(loaded.tokenizer, messages("dense", len(history)) + [{"role": "user", "content": ""}])
    st.caption(f"Context: the conversation so far is {used:,} of {window:,} tokens; each reply adds up to "
               f"{int(max_new):,}.")

prompt = st.chat_input("Ask both models…" if not exported else "Ask the exported model…", key="chat_input")
if prompt:
    msgs = {side: messages(side, len(history)) + [{"role": "user", "content": prompt}] for side in SIDES}
    try:
        for side, (model, _) in SIDES.items():  # refuse before anything runs, not part-way
            check_lengths(model, prompt_tokens(loaded.tokenizer, msgs[side]), int(max_new))
    except Exception as e:  # noqa: BLE001 - TextError: says how long it is and what to do
        show_error(e)
    else:
        turn = {"prompt": prompt, "dense": None, "pruned": None}
        history.append(turn)
        show_text(prompt, st.chat_message("user"))
        stop = st.empty()
        stop.button("Stop", key="chat_stop", icon=":material/stop_circle:",
                    help="Stop generating; what was generated so far is kept.")
        cols = st.columns(len(SIDES), gap="large")
        try:
            for (side, (model, _)), col in zip(SIDES.items(), cols):
                stream_side(model, side, turn, msgs[side], col)
        except ScriptControlException:
            raise
        except Exception as e:  # noqa: BLE001 - e.g. out of memory: advice, not a traceback
            show_error(e)
        stop.empty()

if history and st.button("Clear conversation", key="chat_clear", icon=":material/delete_sweep:"):
    st.session_state["chat"] = []
    st.rerun()
