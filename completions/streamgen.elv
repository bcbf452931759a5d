
use builtin;
use str;

set edit:completion:arg-completer[streamgen] = {|@words|
    fn spaces {|n|
        builtin:repeat $n ' ' | str:join ''
    }
    fn cand {|text desc|
        edit:complex-candidate $text &display=$text' '(spaces (- 14 (wcswidth $text)))$desc
    }
    var command = 'streamgen'
    for word $words[1..-1] {
        if (str:has-prefix $word '-') {
            break
        }
        set command = $command';'$word
    }
    var completions = [
        &'streamgen'= {
            cand -m 'A local .gguf file or a Hugging Face repo: owner/repo, owner/repo:QUANT, owner/repo/file.gguf, each optionally @revision'
            cand --model 'A local .gguf file or a Hugging Face repo: owner/repo, owner/repo:QUANT, owner/repo/file.gguf, each optionally @revision'
            cand --ctx-size 'Context size in tokens (prompt + answer); 0 means the model''s maximum'
            cand --prompt-cache 'Where the prompt cache keeps the keys and values of prompts, so that a later prompt that starts the same way (the same piped document with another question, a long system prompt) skips computing that part; `off` turns it off [default: $XDG_CACHE_HOME/streamgen/prompts, or ~/.cache/streamgen/prompts]'
            cand --prompt-cache-max 'The most the prompt cache folder holds (K, M, G); the least recently used prompts go first'
            cand -t 'Threads for the matrix kernels [default: the number of physical cores]'
            cand --threads 'Threads for the matrix kernels [default: the number of physical cores]'
            cand --draft-model 'A small model with the same vocabulary proposes the next tokens, checked by the model in one pass (a file, a Hub repo or repo:QUANT, as -m). Greedy output does not change; sampled output keeps its distribution'
            cand --draft-max 'The most tokens proposed at once (by the draft model or the lookup); at most 14'
            cand -n 'Stop after N generated tokens [default: until the model ends or the context is full]'
            cand --max-tokens 'Stop after N generated tokens [default: until the model ends or the context is full]'
            cand --logprobs 'With --json: each token''s log-probability under the model, and the N most likely tokens at its place (0 to 20), as the OpenAI API reports them'
            cand --temperature 'Sampling temperature; 0 always picks the most likely token (greedy)'
            cand --top-k 'Sample among the K most likely tokens; 0 disables [default: 40]'
            cand --top-p 'Sample among the most likely tokens whose probabilities add up to P; 1 disables'
            cand --min-p 'Drop tokens less likely than P times the most likely one; 0 disables [default: 0.05]'
            cand --repeat-penalty 'Penalize tokens seen in the last --repeat-last-n tokens; 1 disables [default: 1]'
            cand --repeat-last-n 'How many recent tokens the repeat penalty looks at'
            cand --seed 'Random seed: the same seed and input give the same output [default: random]'
            cand --stop 'End the answer before this text; it is never printed. Repeatable'
            cand -s 'A system message for chat models (folded into the first user turn where the template has no system role)'
            cand --system 'A system message for chat models (folded into the first user turn where the template has no system role)'
            cand --chat-template 'Use this chat template instead of the model''s: a built-in name (gemma, chatml, llama3) or a Jinja file'
            cand --reasoning 'Where a reasoning model''s thinking goes: hide, stderr (dimmed on a terminal) or stdout (between <think> and </think>; with --json, as "reasoning" objects) [default: stderr when it is a terminal, else hide; with --json, stdout]'
            cand --cid 'Continue conversation ID of the log (as --logs shows it)'
            cand --logs 'Print the last N exchanges of the log (as JSON Lines with --json), then exit'
            cand --logs-search 'Print the logged exchanges that contain every word of TEXT (best match last), then exit'
            cand --logs-delete 'Delete conversation ID from the log (or every one, with --all), then exit'
            cand --endpoint 'Send the requests to this OpenAI-compatible server (its base URL, such as http://gpu-box:8000/v1) instead of running the model here [env: STREAMGEN_ENDPOINT]'
            cand --api-key 'The server''s API key, sent as a bearer token [env: STREAMGEN_API_KEY]'
            cand --parallel 'With --each-line, how many lines are answered at once [default: 15 here on CPUs with AVX-512 VNNI, else 8 (one batched decode step for all of them); 4 requests in flight with --endpoint]'
            cand --json-schema 'The answer is JSON valid against this JSON Schema, given inline or as @FILE; ''{}'' allows any JSON value. JSON is written on one line'
            cand --schema 'The answer is a JSON object with these fields (llm''s concise syntax): ''name, age int, bio: a short bio''. Types are int, float, bool and str (the default); a description goes after a colon; fields are separated by commas, or by newlines when there are any'
            cand --grammar 'The answer matches this grammar: Lark (llguidance''s dialect; see docs/structured-output.md) or GBNF, llama.cpp''s format'
            cand --regex 'The whole answer matches this regular expression (Rust regex syntax)'
            cand --choice 'The answer is exactly one of these strings, separated by commas'
            cand --idle-timeout 'Give up when the server sends nothing for this many seconds'
            cand --offline 'Never touch the network: use only local files and the cache'
            cand --no-prompt-cache 'Neither read nor write the prompt cache'
            cand --lookup 'Speculate from the text so far (prompt lookup): proposals copied from earlier text are checked in one pass. Greedy output does not change; sampled output keeps its distribution but not a seed''s draws [default: on with --temperature 0]'
            cand --no-lookup 'Never speculate from the text so far'
            cand --ignore-eos 'Generate exactly -n tokens: the model''s end-of-generation tokens are text like any other (for benchmarks, and to force a length)'
            cand --raw 'Plain completion of the prompt text, without a chat template'
            cand --no-think 'Ask a reasoning model to answer without thinking first: the chat template is rendered with enable_thinking=false (Qwen3; sent as chat_template_kwargs with --endpoint)'
            cand --each-line 'Treat each line of standard input as a separate prompt, and write exactly one line of output per input line (newlines in an answer are written as \n, backslashes as \\)'
            cand --count-tokens 'Print how many tokens the prompt is (after the chat template, as -v shows it), then exit without generating; with --each-line, one count per line. Reads only the model''s vocabulary'
            cand --tokenize 'Print the prompt''s token ids as a JSON array (`[1, 2, 3]`), then exit without generating; with --each-line, one array per line. Reads only the model''s vocabulary'
            cand --verbose-prompt 'Print the exact prompt given to the model (after the chat template) and its token ids, as `[1, 2, 3]`, on stderr'
            cand --no-stream 'Print the whole answer once, at the end, instead of streaming it'
            cand --json 'Write JSON Lines: one object per streamed chunk, then one with the finish reason, token counts and timings'
            cand -x 'Write only the contents of the answer''s first fenced code block (``` lines), streamed; the answer ends with the block. Nothing, and a note on stderr, when there is none'
            cand --extract 'Write only the contents of the answer''s first fenced code block (``` lines), streamed; the answer ends with the block. Nothing, and a note on stderr, when there is none'
            cand --stats 'After the answer, print token counts, speeds, time to first token and load time on stderr'
            cand -q 'Print no progress or informational lines on stderr; errors still print'
            cand --quiet 'Print no progress or informational lines on stderr; errors still print'
            cand -c 'Continue the latest conversation in the log: the model sees its earlier turns (and its system prompt, unless -s gives another)'
            cand --continue 'Continue the latest conversation in the log: the model sees its earlier turns (and its system prompt, unless -s gives another)'
            cand -i 'A chat in the terminal: line editing and history, each answer streamed; Ctrl-C stops an answer, Ctrl-D leaves; /clear, /system TEXT, /save FILE. Also what plain `streamgen` opens when stdin and stdout are both terminals'
            cand --interactive 'A chat in the terminal: line editing and history, each answer streamed; Ctrl-C stops an answer, Ctrl-D leaves; /clear, /system TEXT, /save FILE. Also what plain `streamgen` opens when stdin and stdout are both terminals'
            cand --no-log 'Do not log this exchange (every exchange is logged in $XDG_STATE_HOME/streamgen/logs.db unless STREAMGEN_LOG=0)'
            cand --all 'With --logs-delete: delete every conversation'
            cand --json-object 'The answer is a JSON object'
            cand -h 'Print help (see more with ''--help'')'
            cand --help 'Print help (see more with ''--help'')'
            cand -V 'Print version'
            cand --version 'Print version'
        }
    ]
    $completions[$command]
}
