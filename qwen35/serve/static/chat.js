// qwen35 chat page: a client of this server's own OpenAI-compatible API.
//
// Each turn is one streamed POST v1/chat/completions carrying the whole conversation (this page keeps it; the
// server is stateless).  Model output is only ever put into the page as text (textContent / text nodes), never
// parsed as HTML: the model can write anything.
"use strict";

const $ = (id) => document.getElementById(id);
const ui = {
  messages: $("messages"), composer: $("composer"), input: $("input"), send: $("send"), stop: $("stop"),
  newChat: $("new-chat"), model: $("model"), apiKey: $("api-key"), thinking: $("thinking"), system: $("system"),
  temperature: $("temperature"), topP: $("top-p"), maxTokens: $("max-tokens"), tools: $("tools"),
};

const state = {
  history: [],        // the conversation as the API takes it (no system message: that comes from the settings)
  modelId: null,      // from GET v1/models
  controller: null,   // the AbortController of the request in flight, if any
  pendingTools: null, // the tool-result form waiting for the user's answers, if any
  chat: 0,            // counts "new chat"s: a request of an earlier conversation must not touch this one
};

// ------------------------------------------------------------------------------------------- helpers

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function apiUrl(path) {
  return new URL(path, document.baseURI);  // relative: works behind a proxy that adds a path prefix
}

function authHeaders() {
  const key = ui.apiKey.value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

function nearBottom() {
  const m = ui.messages;
  return m.scrollHeight - m.scrollTop - m.clientHeight < 80;
}

function append(node) {
  const stick = nearBottom();  // follow the answer, unless the user scrolled up to read
  ui.messages.append(node);
  if (stick) ui.messages.scrollTop = ui.messages.scrollHeight;
  return node;
}

function follow(stick) {
  if (stick) ui.messages.scrollTop = ui.messages.scrollHeight;
}

function showError(message) {
  const line = el("div", "error", `Error: ${message}`);
  line.setAttribute("role", "alert");
  return append(line);
}

function prettyJson(text) {
  try {
    return JSON.stringify(JSON.parse(text), null, 2);
  } catch {
    return text;  // not JSON (a plain-text tool result, or arguments cut short): show it as it is
  }
}

// The readable message of a failed HTTP response: the server's {"error": {"message"}} when it sent one.
async function httpErrorMessage(res) {
  let text = "";
  try { text = await res.text(); } catch { /* the body could not be read: the status line still says something */ }
  try {
    const body = JSON.parse(text);
    const message = body && body.error && (body.error.message || body.error);
    if (message) return `${res.status}: ${typeof message === "string" ? message : JSON.stringify(message)}`;
  } catch { /* not JSON */ }
  const detail = text.trim().slice(0, 300);
  return `HTTP ${res.status} ${res.statusText}`.trim() + (detail ? `: ${detail}` : "");
}

// ------------------------------------------------------------------------------------------- the model

async function loadModel() {
  try {
    const res = await fetch(apiUrl("v1/models"), { headers: authHeaders() });
    if (!res.ok) {
      const hint = res.status === 401 ? " (enter the server's API key under Settings)" : "";
      throw new Error(`could not load the model list: ${await httpErrorMessage(res)}${hint}`);
    }
    const body = await res.json();
    const id = body && Array.isArray(body.data) && body.data[0] && body.data[0].id;
    if (typeof id !== "string") throw new Error("the server lists no model");
    state.modelId = id;
    ui.model.textContent = id;
    document.title = `${id} · qwen35 chat`;
    return true;
  } catch (e) {
    if (!state.modelId) ui.model.textContent = "unknown";  // a name known from before stays: the server is the same
    showError(e instanceof TypeError ? `could not reach the server (${e.message})` : e.message);
    return false;
  }
}

// ------------------------------------------------------------------------------------------- request

// The request body without its messages; throws an Error whose message says which setting is wrong.
function requestOptions() {
  const body = { stream: true, stream_options: { include_usage: true } };
  if (state.modelId) body.model = state.modelId;  // else the server takes its only model
  body.chat_template_kwargs = { enable_thinking: ui.thinking.checked };
  const numbers = [["temperature", ui.temperature, false], ["top_p", ui.topP, false],
                   ["max_tokens", ui.maxTokens, true]];
  for (const [name, input, integer] of numbers) {
    const raw = input.value.trim();
    if (input.validity.badInput) throw new Error(`${name} is not a number`);
    if (raw === "") continue;  // empty: the server's default (the checkpoint's generation_config)
    const value = Number(raw);
    if (!Number.isFinite(value) || (integer && !Number.isInteger(value))) {
      throw new Error(`${name} must be ${integer ? "a whole number" : "a number"}, not '${raw}'`);
    }
    body[name] = value;
  }
  const tools = ui.tools.value.trim();
  if (tools) {
    let parsed;
    try { parsed = JSON.parse(tools); } catch (e) { throw new Error(`Tools is not valid JSON: ${e.message}`); }
    if (!Array.isArray(parsed)) throw new Error("Tools must be a JSON array of tools");
    if (parsed.length) body.tools = parsed;  // the server checks each tool and says what is wrong
  }
  return body;
}

function wireMessages(pending) {
  const system = ui.system.value.trim();
  return [...(system ? [{ role: "system", content: system }] : []), ...state.history, ...pending];
}

// Server-sent events of a fetch response, one parsed JSON object per call of onEvent.  Resolves at [DONE]
// (true) or at the end of the body (false).
async function readEvents(res, onEvent) {
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  try {
    return await parseEvents(reader, onEvent);
  } finally {
    reader.cancel().catch(() => {});  // after [DONE], or a bad or error event: let the connection go
  }
}

async function parseEvents(reader, onEvent) {
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return false;
    // only CRLF pairs are folded: a CR at the end of one read meets its LF at the start of the next
    buffer = (buffer + value).replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block.split("\n").filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(line.startsWith("data: ") ? 6 : 5)).join("\n");
      if (!data) continue;  // a comment or keep-alive
      if (data === "[DONE]") return true;
      let event;
      try { event = JSON.parse(data); } catch { throw new Error(`the server sent an unreadable event: ${data.slice(0, 200)}`); }
      onEvent(event);
    }
  }
}

// ------------------------------------------------------------------------------------------- rendering

function renderUser(text) {
  const node = el("div", "msg user");
  node.append(el("div", "role", "you"), document.createTextNode(text));
  return append(node);
}

function renderToolResult(name, content) {
  const node = el("div", "msg tool");
  node.append(el("div", "role", `tool result · ${name}`), el("pre", "tool-output", prettyJson(content)));
  return append(node);
}

// The view of one assistant answer, filled in as its deltas arrive.
class AnswerView {
  constructor() {
    this.node = el("div", "msg assistant");
    this.node.append(el("div", "role", state.modelId || "assistant"));
    this.answer = el("div", "answer");
    this.calls = el("div", "tool-calls");
    this.meta = el("div", "meta");
    this.node.append(this.answer, this.calls, this.meta);
    this.reasoning = null;     // the <details>, made when the first reasoning arrives (none with thinking off)
    this.reasoningText = null;
    this.answerText = null;
    this.userToggled = false;  // once the user opens or closes the thinking, leave it as they set it
    this.callViews = [];
    append(this.node);
  }

  addReasoning(text) {
    if (!this.reasoning) {
      this.reasoning = el("details", "reasoning");
      this.reasoning.open = true;  // open while the model thinks, so that something visibly happens
      this.summary = el("summary", "", "Thinking…");
      this.summary.addEventListener("click", () => { this.userToggled = true; });
      this.reasoningText = el("div", "reasoning-text");
      this.reasoningText.append(document.createTextNode(""));
      this.reasoning.append(this.summary, this.reasoningText);
      this.node.insertBefore(this.reasoning, this.answer);
    }
    this.reasoningText.firstChild.appendData(text);
  }

  endReasoning(collapse) {
    if (!this.reasoning) return;
    this.summary.textContent = "Thinking";
    if (collapse && !this.userToggled) this.reasoning.open = false;  // the answer is what matters now
  }

  addContent(text) {
    this.endReasoning(true);
    if (!this.answerText) {
      this.answerText = document.createTextNode("");
      this.answer.append(this.answerText);
    }
    this.answerText.appendData(text);
  }

  // one OpenAI delta.tool_calls[i] piece: the first of a call has id and name, the rest argument fragments
  addToolCall(call) {
    this.endReasoning(true);
    let view = this.callViews[call.index];
    if (!view) {
      const box = el("div", "tool-call");
      const name = el("div", "tool-name");
      const args = el("pre", "tool-args");
      args.append(document.createTextNode(""));
      box.append(name, args);
      this.calls.append(box);
      view = this.callViews[call.index] = { name, args };
    }
    view.name.textContent = call.name || "?";
    view.args.firstChild.data = call.arguments;
  }

  // after the stream: arguments pretty-printed once whole
  finish(calls, note) {
    this.endReasoning(false);  // an answer that is all thinking stays open: there is nothing else to read
    calls.forEach((call, i) => {
      if (this.callViews[i]) this.callViews[i].args.textContent = prettyJson(call.arguments);
    });
    this.meta.textContent = note;
  }
}

// ------------------------------------------------------------------------------------------- a turn

function setBusy(busy) {
  ui.send.disabled = busy;
  ui.stop.disabled = !busy;
  document.body.classList.toggle("busy", busy);
}

function finishNote(outcome, turn, seconds) {
  const parts = [];
  if (outcome === "stopped") parts.push("stopped");
  else if (turn.finish === "length") parts.push("cut off at max_tokens");
  else if (turn.finish === "tool_calls") parts.push("asks for tool results");
  if (turn.usage && Number.isFinite(turn.usage.completion_tokens)) parts.push(`${turn.usage.completion_tokens} tokens`);
  parts.push(`${seconds.toFixed(1)} s`);
  return parts.join(" · ");
}

function validJson(text) {
  try { JSON.parse(text); return true; } catch { return false; }
}

// One request: `pending` (the new user message or tool results) is added to the history only if the request
// gets an answer, so that a failed turn can be sent again without leaving half of it behind.
async function runTurn(body, pending, pendingNodes, onFail) {
  body.messages = wireMessages(pending);
  const view = new AnswerView();
  const turn = { content: "", reasoning: "", calls: [], finish: null, usage: null };
  const controller = state.controller = new AbortController();
  const chat = state.chat;
  setBusy(true);
  const started = performance.now();
  let outcome = "error";

  const onEvent = (event) => {
    if (!event || typeof event !== "object") return;  // nothing this page can use
    if (event.error) {  // the server failed after the stream began (the status was already 200)
      const e = event.error;
      throw new Error(typeof e === "string" ? e : (e.message || JSON.stringify(e)));
    }
    const stick = nearBottom();
    for (const choice of Array.isArray(event.choices) ? event.choices : []) {
      if (!choice || choice.index) continue;  // this page asks for one choice
      const delta = choice.delta || {};
      // the server sends reasoning under both names, with the same text: take one
      const reasoning = delta.reasoning_content ?? delta.reasoning;
      if (typeof reasoning === "string" && reasoning) {
        turn.reasoning += reasoning;
        view.addReasoning(reasoning);
      }
      if (typeof delta.content === "string" && delta.content) {
        turn.content += delta.content;
        view.addContent(delta.content);
      }
      for (const piece of Array.isArray(delta.tool_calls) ? delta.tool_calls : []) {
        if (!piece || typeof piece !== "object") continue;
        const index = Number.isInteger(piece.index) ? piece.index : turn.calls.length;
        const call = turn.calls[index] ||= { index, id: "", name: "", arguments: "" };
        const fn = piece.function || {};
        if (piece.id) call.id = piece.id;
        if (fn.name) call.name = fn.name;
        if (typeof fn.arguments === "string") call.arguments += fn.arguments;
        view.addToolCall(call);
      }
      if (choice.finish_reason) turn.finish = choice.finish_reason;
    }
    if (event.usage) turn.usage = event.usage;
    follow(stick);
  };

  try {
    const res = await fetch(apiUrl("v1/chat/completions"), {
      method: "POST", signal: controller.signal, body: JSON.stringify(body),
      headers: { "Content-Type": "application/json", ...authHeaders() },
    }).catch((e) => {
      if (e.name === "AbortError") throw e;
      throw new Error(`could not reach the server (${e.message})`);  // fetch says only "Failed to fetch"
    });
    if (!res.ok) throw new Error(await httpErrorMessage(res));
    const type = res.headers.get("Content-Type") || "";
    if (!res.body || !type.startsWith("text/event-stream")) {  // e.g. a proxy's page instead of the server's stream
      const text = res.body ? (await res.text()).trim().slice(0, 200) : "";
      throw new Error(`the server answered ${type || "nothing"} instead of an event stream${text ? `: ${text}` : ""}`);
    }
    const ended = await readEvents(res, onEvent).catch((e) => {
      if (e.name === "AbortError" || !(e instanceof TypeError)) throw e;
      throw new Error(`the connection broke (${e.message})`);
    });
    if (!ended && !turn.finish) throw new Error("the connection closed before the answer was complete");
    outcome = "done";
  } catch (e) {
    if (e.name === "AbortError") outcome = "stopped";  // the stop button; the server aborts the request
    else showError(e.message);
  } finally {
    if (state.controller === controller) state.controller = null;
    setBusy(false);
  }

  if (chat !== state.chat) return;  // "new chat" was pressed meanwhile: this turn belongs to no conversation
  const calls = turn.calls.filter(Boolean);
  view.finish(calls, outcome === "error" ? "" : finishNote(outcome, turn, (performance.now() - started) / 1000));
  if (outcome === "error") {
    if (turn.content || turn.reasoning || calls.length) view.node.classList.add("failed");
    else view.node.remove();  // an empty answer box says nothing the error line does not
    for (const node of pendingNodes) node.classList.add("failed");
    onFail();
    return;
  }
  // a call cut short by the stop button has broken arguments, which the server would refuse next turn
  const whole = calls.filter((c) => validJson(c.arguments || "{}"));
  const message = { role: "assistant", content: turn.content };
  if (turn.reasoning) message.reasoning_content = turn.reasoning;  // the template drops it where it should
  if (whole.length) {
    message.tool_calls = whole.map((c) => ({
      id: c.id || `call_${Math.random().toString(36).slice(2, 10)}`, type: "function",
      function: { name: c.name, arguments: c.arguments || "{}" } }));
  }
  state.history.push(...pending, message);
  if (outcome === "done" && message.tool_calls) askToolResults(view, message.tool_calls);
}

// The page runs no tools: the user answers each call, and the answers go back as role "tool" messages.
function askToolResults(view, calls) {
  const form = el("form", "tool-results");
  const inputs = calls.map((call) => {
    const label = el("label", "", `result of ${call.function.name}`);
    const input = el("textarea", "tool-result-input");
    input.rows = 2;
    input.placeholder = "text or JSON";
    label.append(input);
    form.append(label);
    return input;
  });
  const button = el("button", "send-tool-results", "Send tool results");
  button.type = "submit";
  form.append(button);
  view.node.append(form);
  state.pendingTools = form;

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    if (state.controller) return;
    let body;
    try { body = requestOptions(); } catch (e) { showError(e.message); return; }
    const pending = calls.map((call, i) => ({ role: "tool", tool_call_id: call.id, content: inputs[i].value }));
    button.disabled = true;
    inputs.forEach((input) => { input.disabled = true; });
    const nodes = calls.map((call, i) => renderToolResult(call.function.name, inputs[i].value));
    runTurn(body, pending, nodes, () => {  // failed: the form can be sent again
      button.disabled = false;
      inputs.forEach((input) => { input.disabled = false; });
    }).then(() => { if (form.isConnected && button.disabled) { form.remove(); state.pendingTools = null; } });
  });
}

async function sendMessage() {
  const text = ui.input.value;
  if (!text.trim() || state.controller) return;
  let body;
  try { body = requestOptions(); } catch (e) { showError(e.message); return; }
  ui.input.value = "";  // at once: a second Enter meanwhile finds nothing to send
  if (!state.modelId) {  // the server may have been down, or the key missing, at page load
    if (!(await loadModel())) {
      if (!ui.input.value) ui.input.value = text;
      return;
    }
    body.model = state.modelId;
  }
  if (state.pendingTools) {  // a new message instead of tool results: the calls stay unanswered
    state.pendingTools.remove();
    state.pendingTools = null;
  }
  const node = renderUser(text);
  await runTurn(body, [{ role: "user", content: text }], [node], () => {
    if (!ui.input.value) ui.input.value = text;  // give the message back, to send again
  });
}

function newChat() {
  if (state.controller) state.controller.abort();
  state.chat += 1;
  state.history = [];
  state.pendingTools = null;
  ui.messages.replaceChildren();
  ui.input.focus();
}

// ------------------------------------------------------------------------------------------- wiring

ui.composer.addEventListener("submit", (event) => {
  event.preventDefault();
  sendMessage();
});
ui.input.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    sendMessage();
  }
});
document.addEventListener("keydown", (event) => {
  if (event.key === "Escape" && state.controller) state.controller.abort();
});
ui.stop.addEventListener("click", () => { if (state.controller) state.controller.abort(); });
ui.newChat.addEventListener("click", newChat);
ui.apiKey.addEventListener("change", loadModel);

setBusy(false);
loadModel();
ui.input.focus();
