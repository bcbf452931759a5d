complete -c streamgen -s m -l model -d 'A local .gguf file or a Hugging Face repo: owner/repo, owner/repo:QUANT, owner/repo/file.gguf, each optionally @revision' -r
complete -c streamgen -l ctx-size -d 'Context size in tokens (prompt + answer); 0 means the model\'s maximum' -r
complete -c streamgen -l prompt-cache -d 'Where the prompt cache keeps the keys and values of prompts, so that a later prompt that starts the same way (the same piped document with another question, a long system prompt) skips computing that part; `off` turns it off [default: $XDG_CACHE_HOME/streamgen/prompts, or ~/.cache/streamgen/prompts]' -r -F
complete -c streamgen -l prompt-cache-max -d 'The most the prompt cache folder holds (K, M, G); the least recently used prompts go first' -r
complete -c streamgen -s t -l threads -d 'Threads for the matrix kernels [default: the number of physical cores]' -r
complete -c streamgen -l draft-model -d 'A small model with the same vocabulary proposes the next tokens, checked by the model in one pass (a file, a Hub repo or repo:QUANT, as -m). Greedy output does not change; sampled output keeps its distribution' -r
complete -c streamgen -l draft-max -d 'The most tokens proposed at once (by the draft model or the lookup); at most 14' -r
complete -c streamgen -s n -l max-tokens -d 'Stop after N generated tokens [default: until the model ends or the context is full]' -r
complete -c streamgen -l logprobs -d 'With --json: each token\'s log-probability under the model, and the N most likely tokens at its place (0 to 20), as the OpenAI API reports them' -r
complete -c streamgen -l temperature -d 'Sampling temperature; 0 always picks the most likely token (greedy)' -r
complete -c streamgen -l top-k -d 'Sample among the K most likely tokens; 0 disables [default: 40]' -r
complete -c streamgen -l top-p -d 'Sample among the most likely tokens whose probabilities add up to P; 1 disables' -r
complete -c streamgen -l min-p -d 'Drop tokens less likely than P times the most likely one; 0 disables [default: 0.05]' -r
complete -c streamgen -l repeat-penalty -d 'Penalize tokens seen in the last --repeat-last-n tokens; 1 disables [default: 1]' -r
complete -c streamgen -l repeat-last-n -d 'How many recent tokens the repeat penalty looks at' -r
complete -c streamgen -l seed -d 'Random seed: the same seed and input give the same output [default: random]' -r
complete -c streamgen -l stop -d 'End the answer before this text; it is never printed. Repeatable' -r
complete -c streamgen -s s -l system -d 'A system message for chat models (folded into the first user turn where the template has no system role)' -r
complete -c streamgen -l chat-template -d 'Use this chat template instead of the model\'s: a built-in name (gemma, chatml, llama3) or a Jinja file' -r
complete -c streamgen -l reasoning -d 'Where a reasoning model\'s thinking goes: hide, stderr (dimmed on a terminal) or stdout (between <think> and </think>; with --json, as "reasoning" objects) [default: stderr when it is a terminal, else hide; with --json, stdout]' -r -f -a "hide\t'Nowhere'
stderr\t'To stderr, dimmed on a terminal'
stdout\t'To stdout before the answer, between `<think>` and `</think>` (with `--json`: as `reasoning` objects)'"
complete -c streamgen -l cid -d 'Continue conversation ID of the log (as --logs shows it)' -r
complete -c streamgen -l logs -d 'Print the last N exchanges of the log (as JSON Lines with --json), then exit' -r
complete -c streamgen -l logs-search -d 'Print the logged exchanges that contain every word of TEXT (best match last), then exit' -r
complete -c streamgen -l logs-delete -d 'Delete conversation ID from the log (or every one, with --all), then exit' -r
complete -c streamgen -l endpoint -d 'Send the requests to this OpenAI-compatible server (its base URL, such as http://gpu-box:8000/v1) instead of running the model here [env: STREAMGEN_ENDPOINT]' -r
complete -c streamgen -l api-key -d 'The server\'s API key, sent as a bearer token [env: STREAMGEN_API_KEY]' -r
complete -c streamgen -l parallel -d 'With --each-line, how many lines are answered at once [default: 15 here on CPUs with AVX-512 VNNI, else 8 (one batched decode step for all of them); 4 requests in flight with --endpoint]' -r
complete -c streamgen -l json-schema -d 'The answer is JSON valid against this JSON Schema, given inline or as @FILE; \'{}\' allows any JSON value. JSON is written on one line' -r
complete -c streamgen -l schema -d 'The answer is a JSON object with these fields (llm\'s concise syntax): \'name, age int, bio: a short bio\'. Types are int, float, bool and str (the default); a description goes after a colon; fields are separated by commas, or by newlines when there are any' -r
complete -c streamgen -l grammar -d 'The answer matches this grammar: Lark (llguidance\'s dialect; see docs/structured-output.md) or GBNF, llama.cpp\'s format' -r -F
complete -c streamgen -l regex -d 'The whole answer matches this regular expression (Rust regex syntax)' -r
complete -c streamgen -l choice -d 'The answer is exactly one of these strings, separated by commas' -r
complete -c streamgen -l idle-timeout -d 'Give up when the server sends nothing for this many seconds' -r
complete -c streamgen -l offline -d 'Never touch the network: use only local files and the cache'
complete -c streamgen -l no-prompt-cache -d 'Neither read nor write the prompt cache'
complete -c streamgen -l lookup -d 'Speculate from the text so far (prompt lookup): proposals copied from earlier text are checked in one pass. Greedy output does not change; sampled output keeps its distribution but not a seed\'s draws [default: on with --temperature 0]'
complete -c streamgen -l no-lookup -d 'Never speculate from the text so far'
complete -c streamgen -l ignore-eos -d 'Generate exactly -n tokens: the model\'s end-of-generation tokens are text like any other (for benchmarks, and to force a length)'
complete -c streamgen -l raw -d 'Plain completion of the prompt text, without a chat template'
complete -c streamgen -l no-think -d 'Ask a reasoning model to answer without thinking first: the chat template is rendered with enable_thinking=false (Qwen3; sent as chat_template_kwargs with --endpoint)'
complete -c streamgen -l each-line -d 'Treat each line of standard input as a separate prompt, and write exactly one line of output per input line (newlines in an answer are written as \\n, backslashes as \\\\)'
complete -c streamgen -l count-tokens -d 'Print how many tokens the prompt is (after the chat template, as -v shows it), then exit without generating; with --each-line, one count per line. Reads only the model\'s vocabulary'
complete -c streamgen -l tokenize -d 'Print the prompt\'s token ids as a JSON array (`[1, 2, 3]`), then exit without generating; with --each-line, one array per line. Reads only the model\'s vocabulary'
complete -c streamgen -l verbose-prompt -d 'Print the exact prompt given to the model (after the chat template) and its token ids, as `[1, 2, 3]`, on stderr'
complete -c streamgen -l no-stream -d 'Print the whole answer once, at the end, instead of streaming it'
complete -c streamgen -l json -d 'Write JSON Lines: one object per streamed chunk, then one with the finish reason, token counts and timings'
complete -c streamgen -s x -l extract -d 'Write only the contents of the answer\'s first fenced code block (``` lines), streamed; the answer ends with the block. Nothing, and a note on stderr, when there is none'
complete -c streamgen -l stats -d 'After the answer, print token counts, speeds, time to first token and load time on stderr'
complete -c streamgen -s q -l quiet -d 'Print no progress or informational lines on stderr; errors still print'
complete -c streamgen -s c -l continue -d 'Continue the latest conversation in the log: the model sees its earlier turns (and its system prompt, unless -s gives another)'
complete -c streamgen -s i -l interactive -d 'A chat in the terminal: line editing and history, each answer streamed; Ctrl-C stops an answer, Ctrl-D leaves; /clear, /system TEXT, /save FILE. Also what plain `streamgen` opens when stdin and stdout are both terminals'
complete -c streamgen -l no-log -d 'Do not log this exchange (every exchange is logged in $XDG_STATE_HOME/streamgen/logs.db unless STREAMGEN_LOG=0)'
complete -c streamgen -l all -d 'With --logs-delete: delete every conversation'
complete -c streamgen -l json-object -d 'The answer is a JSON object'
complete -c streamgen -s h -l help -d 'Print help (see more with \'--help\')'
complete -c streamgen -s V -l version -d 'Print version'
