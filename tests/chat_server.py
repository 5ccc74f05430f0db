"""A real OpenAI-compatible chat-completions server on 127.0.0.1 for tests and benchmarks.

Behaviour is chosen per request by a marker in the last user message, `[mode:NAME]`; without a marker the server
answers plain JSON. Modes:

- `json`       plain JSON label
- `reasoning`  JSON content plus `reasoning_content` (DeepSeek-R1 style)
- `think`      `<think>...</think>` before the JSON (R1 served by vLLM/Ollama)
- `fenced`     a ```json fenced block with prose around it
- `prose`      the JSON object embedded in a sentence
- `garbage`    text with no JSON object at all
- `429`        the first call for a prompt gets HTTP 429 with `Retry-After`, later calls succeed
- `500`        always HTTP 500
- `400`        always HTTP 400 (a client error, never worth retrying)
- `hang`       sleeps `hang_s` seconds before answering (to trip the client's timeout)
- `badjson`    HTTP 200 whose body is cut off mid-JSON (a proxy hiccup): the client cannot parse it
- `reasoningfield` JSON content plus `reasoning` (OpenRouter, Ollama and newer vLLM name the field so)
- `lonethink`  reasoning, a lone `</think>`, then the JSON (a chat template that opened `<think>` itself: QwQ, Qwen3)
- `qwenthink`  DashScope's compatible mode for Qwen3: with `enable_thinking` in the body it thinks only when the
               call streams (`reasoning_content` deltas, then content deltas, usage in the last chunk) and refuses a
               plain call with HTTP 400; without it, plain JSON and no reasoning

A request with `"stream": true` gets its reply as server-sent `chat.completion.chunk` events in any mode.

Providers, as their OpenAI-compatible endpoints answer (shapes from their docs and from users' reports):

- `ark`          Volcengine Ark's DeepSeek-R1: `reasoning_content`; `completion_tokens` includes the reasoning
                 (`completion_tokens_details.reasoning_tokens`), `prompt_tokens_details.cached_tokens`
- `gemini`       Gemini's OpenAI endpoint: the JSON in a ```json fence; `total_tokens` counts the thinking tokens that
                 `completion_tokens` leaves out (they are billed as output)
- `dashscope`    DashScope compatible mode (Qwen-Max): plain content, `prompt_tokens_details`, `system_fingerprint: null`
- `ark401`       HTTP 401 `{"error": {"code": "AuthenticationError", "type": "Unauthorized", …}}`
- `gemini400`    HTTP 400 whose body is a JSON *list* `[{"error": {"status": "INVALID_ARGUMENT", … "API key not valid"}}]`
- `gemini429`    HTTP 429, list body `RESOURCE_EXHAUSTED` with the retry delay in the body, no Retry-After header
- `gemini503`    HTTP 503, list body `UNAVAILABLE` ("The model is overloaded")
- `dashscope401` HTTP 401 `{"error": {"code": "invalid_api_key", "message": "Incorrect API key provided. "}, "request_id": …}`
- `dashscope500` HTTP 500 `{"error": {"code": "InternalError", …}}`

A request with `logprobs: true` (and `top_logprobs: k`) gets `choices[0].logprobs.content` as vLLM returns it: one
entry per token of the answer (`token`, `logprob`, `bytes`, `top_logprobs`). With a `tokenizer` (byte-level BPE) the
server tokenizes its answer with it and scripts the alternatives and log-probs with `scripted_logprobs`, so a test
can check every stored number; without one each character is a token.

`default_mode` is the mode of a prompt without a marker (`json` unless given), so a test can make every prompt of a
real dataset fail one way.

Every request is recorded in `server.calls` (prompt, mode, status) so a test can count what was asked.
"""
from __future__ import annotations
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODE_RE = re.compile(r'\[mode:([a-z0-9]+)\]')

PROVIDER_ERRORS = {   # mode: (HTTP status, body)
    'ark401': (401, {'error': {'code': 'AuthenticationError', 'message': 'The API key format is incorrect. Request id: '
                               '0217000000000000000000000000000000000000000000000', 'param': '', 'type': 'Unauthorized'}}),
    'gemini400': (400, [{'error': {'code': 400, 'message': 'API key not valid. Please pass a valid API key.',
                                   'status': 'INVALID_ARGUMENT',
                                   'details': [{'@type': 'type.googleapis.com/google.rpc.ErrorInfo', 'reason': 'API_KEY_INVALID',
                                                'domain': 'googleapis.com',
                                                'metadata': {'service': 'generativelanguage.googleapis.com'}}]}}]),
    'gemini429': (429, [{'error': {'code': 429, 'message': 'You exceeded your current quota, please check your plan and '
                                   'billing details.', 'status': 'RESOURCE_EXHAUSTED',
                                   'details': [{'@type': 'type.googleapis.com/google.rpc.RetryInfo', 'retryDelay': '1s'}]}}]),
    'gemini503': (503, [{'error': {'code': 503, 'message': 'The model is overloaded. Please try again later.',
                                   'status': 'UNAVAILABLE'}}]),
    'dashscope401': (401, {'error': {'message': 'Incorrect API key provided. ', 'type': 'invalid_request_error',
                                     'param': None, 'code': 'invalid_api_key'},
                           'request_id': '5d8b7c3e-0000-0000-0000-000000000000'}),
    'dashscope500': (500, {'error': {'message': 'An internal error has occured, please try again later.',
                                     'type': 'internal_error', 'param': None, 'code': 'InternalError'},
                           'request_id': '5d8b7c3e-0000-0000-0000-000000000001'}),
}


def label_for(prompt: str) -> dict:
    "A deterministic label that names the prompt, so a test can check the answer belongs to its question."
    tag = prompt.strip().splitlines()[0][:40] if prompt.strip() else ''
    return {"prediction": "震荡上行", "analysis": f"回答: {tag}", "advice": "持有观望"}


class ChatServer(ThreadingHTTPServer):
    "Threaded chat-completions server; `delay` seconds per answer, `retry_after` seconds sent with 429s."
    daemon_threads = True
    request_queue_size = 256      # socketserver's default of 5 drops bursts of concurrent connects

    def __init__(self, port: int = 0, delay: float = 0.0, retry_after: float = 1, hang_s: float = 5.0,
                 default_mode: str = 'json', tokenizer=None):
        super().__init__(('127.0.0.1', port), _Handler)
        self.delay, self.retry_after, self.hang_s, self.default_mode = delay, retry_after, hang_s, default_mode
        self.tokenizer = tokenizer    # tokenizes answers for `logprobs` requests (None: one token per character)
        self.calls: list[dict] = []
        self.lock = threading.Lock()
        self.inflight = self.max_inflight = 0   # requests being answered now / at most at once
        self._seen429: set[str] = set()
        self._thread = None

    @property
    def base_url(self) -> str: return f'http://127.0.0.1:{self.server_address[1]}/v1'

    def start(self) -> 'ChatServer':
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self):
        self.shutdown(); self.server_close()

    def calls_for(self, needle: str) -> int:
        "How many requests had `needle` in their prompt."
        with self.lock: return sum(needle in c['prompt'] for c in self.calls)

    def __enter__(self): return self.start()
    def __exit__(self, *exc): self.stop()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'
    disable_nagle_algorithm = True  # headers and body go out in separate writes: no 40 ms delayed-ACK stall

    def log_message(self, *args): pass

    def _send(self, status: int, body: dict | list, headers: dict | None = None):
        data = json.dumps(body, ensure_ascii=False).encode()
        self.send_response(status)
        self.send_header('Content-Type', 'application/json')
        self.send_header('Content-Length', str(len(data)))
        for k, v in (headers or {}).items(): self.send_header(k, v)
        self.end_headers()
        try: self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError): pass  # the client gave up (timeout test)

    def do_GET(self):
        srv: ChatServer = self.server
        if self.path.rstrip('/').endswith('/stats'):
            with srv.lock: return self._send(200, {'calls': list(srv.calls)})
        self._send(404, {'error': {'message': 'not found'}})

    def do_POST(self):
        srv: ChatServer = self.server
        if not self.path.rstrip('/').endswith('/chat/completions'):
            return self._send(404, {'error': {'message': f'no route {self.path}'}})
        req = json.loads(self.rfile.read(int(self.headers.get('Content-Length', 0))) or b'{}')
        prompt = next((m['content'] for m in reversed(req.get('messages', [])) if m.get('role') == 'user'), '')
        mode = (m.group(1) if (m := MODE_RE.search(prompt)) else srv.default_mode)
        status = 200
        if mode == '429':
            with srv.lock:
                first = prompt not in srv._seen429
                srv._seen429.add(prompt)
            if first: status = 429
        elif mode == '500': status = 500
        elif mode == '400': status = 400
        elif mode == 'qwenthink' and req.get('enable_thinking') and not req.get('stream'): status = 400
        elif mode in PROVIDER_ERRORS: status = PROVIDER_ERRORS[mode][0]
        with srv.lock:
            srv.calls.append({'prompt': prompt, 'mode': mode, 'status': status, 't': time.time(),
                              'auth': self.headers.get('Authorization'), 'model': req.get('model')})
        if mode == 'badjson':
            data = b'{"id": "chatcmpl-1", "choices": [{"index": 0, "mess'
            self.send_response(200); self.send_header('Content-Type', 'application/json')
            self.send_header('Content-Length', str(len(data))); self.end_headers(); self.wfile.write(data)
            return
        if mode in PROVIDER_ERRORS: return self._send(*PROVIDER_ERRORS[mode])
        if status == 429:
            return self._send(429, {'error': {'message': 'rate limited', 'type': 'rate_limit'}},
                              {'Retry-After': f'{srv.retry_after:g}'})
        if status == 400 and mode == 'qwenthink':   # DashScope's words
            return self._send(400, {'error': {'code': 'InvalidParameter', 'type': 'invalid_request_error',
                                              'message': 'parameter.enable_thinking must be set to false for non-streaming calls'}})
        if status >= 400:
            return self._send(status, {'error': {'message': f'scripted {status}', 'type': 'server_error'}})
        with srv.lock: srv.inflight += 1; srv.max_inflight = max(srv.max_inflight, srv.inflight)
        try:
            if mode == 'hang': time.sleep(srv.hang_s)
            if srv.delay: time.sleep(srv.delay)
        finally:
            with srv.lock: srv.inflight -= 1
        reply = _completion(req.get('model', 'test-model'), prompt, mode, thinking=bool(req.get('enable_thinking')))
        if req.get('logprobs'):
            content = reply['choices'][0]['message']['content']
            reply['choices'][0]['logprobs'] = {'content': _logprobs(content, int(req.get('top_logprobs') or 0), srv.tokenizer)}
        if req.get('stream'): return self._stream(reply, bool((req.get('stream_options') or {}).get('include_usage')))
        self._send(200, reply)

    def _stream(self, reply: dict, include_usage: bool):
        "Send `reply` as server-sent events: a role chunk, reasoning and content in pieces, finish, usage, [DONE]."
        msg = reply['choices'][0]['message']
        base = {k: reply[k] for k in ('id', 'created', 'model')} | {'object': 'chat.completion.chunk'}
        chunk = lambda delta, finish=None: {**base, 'choices': [{'index': 0, 'delta': delta, 'finish_reason': finish}]}
        events = [chunk({'role': 'assistant', 'content': ''})]
        for key in ('reasoning_content', 'reasoning', 'content'):
            text = msg.get(key) or ''
            events += [chunk({key: text[i:i + 7]}) for i in range(0, len(text), 7)]
        events.append(chunk({}, 'stop'))
        if include_usage: events.append({**base, 'choices': [], 'usage': reply['usage']})
        data = ''.join(f'data: {json.dumps(e, ensure_ascii=False)}\n\n' for e in events).encode() + b'data: [DONE]\n\n'
        self.send_response(200)
        self.send_header('Content-Type', 'text/event-stream')
        self.send_header('Content-Length', str(len(data)))
        self.end_headers()
        try: self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError): pass


def _completion(model: str, prompt: str, mode: str, thinking: bool = False) -> dict:
    label = json.dumps(label_for(prompt), ensure_ascii=False)
    reasoning = field = None
    content = {
        'json': label,
        'reasoning': label,
        'hang': label,
        '429': label,
        'think': f'<think>先看均线，再看成交量。</think>\n{label}',
        'fenced': f'好的，以下是分析：\n```json\n{label}\n```\n仅供参考。',
        'prose': f'根据K线数据，我的回答是 {label} ，请注意风险。',
        'garbage': '抱歉，我无法给出结构化的回答。',
        'lonethink': f'先看趋势，再看量能，判断震荡上行。\n</think>\n\n{label}',
    }.get(mode, label)
    if mode in ('reasoning', 'ark') or (mode == 'qwenthink' and thinking):
        reasoning, field = '近30日先跌后涨，MACD金叉，判断震荡上行。', 'reasoning_content'
    if mode == 'reasoningfield': reasoning, field = '均线多头排列，量能温和放大，判断震荡上行。', 'reasoning'
    if mode == 'gemini': content = f'```json\n{label}\n```'
    message = {'role': 'assistant', 'content': content}
    if reasoning: message[field] = reasoning
    n_in, n_out = len(prompt), len(content) + len(reasoning or '')
    usage = {'prompt_tokens': n_in, 'completion_tokens': n_out, 'total_tokens': n_in + n_out}
    out = {'id': f'chatcmpl-{abs(hash(prompt)) % 10**9}', 'object': 'chat.completion', 'created': int(time.time()),
           'model': model, 'choices': [{'index': 0, 'message': message, 'finish_reason': 'stop'}], 'usage': usage}
    if mode == 'ark':
        usage.update(prompt_tokens_details={'cached_tokens': 0}, completion_tokens_details={'reasoning_tokens': len(reasoning)})
        out.update(service_tier='default')
    elif mode == 'gemini':   # thinking: in total_tokens (and billed), not in completion_tokens
        usage['total_tokens'] += THOUGHT_TOKENS
    elif mode == 'dashscope':
        usage['prompt_tokens_details'] = {'cached_tokens': 0}
        out.update(system_fingerprint=None, choices=[{**out['choices'][0], 'logprobs': None}])
    return out


THOUGHT_TOKENS = 500   # what a `gemini` answer spent on thinking


def _byte_decoder() -> dict:
    "GPT-2's printable character -> byte table (byte-level BPE vocabularies spell their tokens with it)."
    bs = list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), ord('¬') + 1)) + list(range(ord('®'), ord('ÿ') + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs: bs.append(b); cs.append(256 + n); n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def scripted_logprobs(ids: list, k: int, vocab_size: int) -> tuple:
    "The scripted top-k of each answer token: ids (the token, then the next k-1 ids) and log-probs (-0.1.. then falling)."
    out_ids, out_lp = [], []
    for t, a in enumerate(ids):
        alts = [a] + [(a + 1 + j) % vocab_size for j in range(k - 1)]
        out_ids.append(alts)
        out_lp.append([-0.1 * (1 + t % 3)] + [-1.0 - j - 0.5 * (t % 2) for j in range(k - 1)])
    return out_ids, out_lp


def _logprobs(content: str, k: int, tokenizer=None) -> list:
    "vLLM-style `logprobs.content` for `content`: per token its text, bytes, log-prob and `k` alternatives."
    if tokenizer is None:
        chars = list(content)
        return [{'token': c, 'logprob': -0.1, 'bytes': list(c.encode()), 'top_logprobs':
                 [{'token': c, 'logprob': -0.1, 'bytes': list(c.encode())}][:k]} for c in chars]
    dec = _byte_decoder()
    ids = tokenizer(content, add_special_tokens=False)['input_ids']
    raw = lambda i: [dec[ch] for ch in tokenizer.convert_ids_to_tokens(i)]
    entry = lambda i, lp: {'token': tokenizer.decode([i]), 'logprob': lp, 'bytes': raw(i)}
    alt_ids, alt_lp = scripted_logprobs(ids, max(k, 1), len(tokenizer))
    return [{**entry(i, lps[0]), 'top_logprobs': [entry(j, v) for j, v in zip(alts, lps)][:k]}
            for i, alts, lps in zip(ids, alt_ids, alt_lp)]


if __name__ == '__main__':
    import argparse
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--port', type=int, default=8765)
    p.add_argument('--delay', type=float, default=0.0)
    a = p.parse_args()
    srv = ChatServer(a.port, delay=a.delay)
    print(srv.base_url, flush=True)
    srv.serve_forever()
