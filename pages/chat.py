"""Chat page: the same prompt to the dense and the pruned model side by side, streamed, same seed, tokens/s."""
import streamlit as st

from pruneviz.chat import stream_reply
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

st.caption(f"Right side: **{how}** · plan: {'nothing removed' if plan.is_empty() else plan.summary()}")
history = st.session_state["chat"]


def messages(side: str, upto: int) -> list[dict]:
    """The conversation of one side (its own earlier replies) up to turn ``upto``."""
    msgs = [{"role": "system", "content": system}] if system.strip() else []
    for turn in history[:upto]:
        msgs += [{"role": "user", "content": turn["prompt"]}, {"role": "assistant", "content": turn[side] or ""}]
    return msgs


def stats_line(stats) -> str:
    if not stats:
        return ""
    return f"{stats['tokens']} tokens · {stats['seconds']:.1f} s · **{stats['tps']:.1f} tokens/s**" + \
        (" · stopped" if stats.get("stopped") else "")


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


def stream_side(model, side: str, turn: dict, col) -> None:
    """Stream one side's reply into ``col``; keeps the partial reply if the user interrupts."""
    with col.chat_message("assistant", avatar=":material/deployed_code:" if side == "dense"
                          else ":material/content_cut:"):
        stream = stream_reply(model, loaded.tokenizer, messages(side, len(history) - 1) +
                              [{"role": "user", "content": turn["prompt"]}], max_new_tokens=int(max_new),
                              temperature=float(temperature), top_p=float(top_p), seed=int(seed))
        try:
            text = write_stream(stream)
        except ScriptControlException:
            stream.stop()
            turn[side], turn[side + "_stats"] = stream.text + " …", None
            raise
        turn[side] = text
        s = stream.stats
        turn[side + "_stats"] = {"tokens": s.n_tokens, "seconds": s.seconds, "tps": s.tokens_per_s,
                                 "stopped": s.stopped} if s else None
        st.caption(stats_line(turn[side + "_stats"]))


left, right = st.columns(2, gap="large")
left.markdown("#### Dense")
right.markdown("#### Pruned")
for turn in history:
    for side, col in (("dense", left), ("pruned", right)):
        show_text(turn["prompt"], col.chat_message("user"))
        if turn.get(side) is not None:
            with col.chat_message("assistant", avatar=":material/deployed_code:" if side == "dense"
                                  else ":material/content_cut:"):
                if turn[side]:
                    show_text(turn[side])
                else:
                    st.caption("(empty reply)")
                st.caption(stats_line(turn.get(side + "_stats")))

prompt = st.chat_input("Ask both models…", key="chat_input")
if prompt:
    turn = {"prompt": prompt, "dense": None, "pruned": None}
    history.append(turn)
    for side, col in (("dense", left), ("pruned", right)):
        show_text(prompt, col.chat_message("user"))
    try:
        stream_side(loaded.model, "dense", turn, left)
        stream_side(pruned_model, "pruned", turn, right)
    except ScriptControlException:
        raise
    except Exception as e:  # noqa: BLE001 - e.g. out of memory: advice, not a traceback
        show_error(e)

if history and st.button("Clear conversation", key="chat_clear", icon=":material/delete_sweep:"):
    st.session_state["chat"] = []
    st.rerun()
