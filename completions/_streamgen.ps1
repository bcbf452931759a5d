
using namespace System.Management.Automation
using namespace System.Management.Automation.Language

Register-ArgumentCompleter -Native -CommandName 'streamgen' -ScriptBlock {
    param($wordToComplete, $commandAst, $cursorPosition)

    $commandElements = $commandAst.CommandElements
    $command = @(
        'streamgen'
        for ($i = 1; $i -lt $commandElements.Count; $i++) {
            $element = $commandElements[$i]
            if ($element -isnot [StringConstantExpressionAst] -or
                $element.StringConstantType -ne [StringConstantType]::BareWord -or
                $element.Value.StartsWith('-') -or
                $element.Value -eq $wordToComplete) {
                break
        }
        $element.Value
    }) -join ';'

    $completions = @(switch ($command) {
        'streamgen' {
            [CompletionResult]::new('-m', '-m', [CompletionResultType]::ParameterName, 'A local .gguf file or a Hugging Face repo: owner/repo, owner/repo:QUANT, owner/repo/file.gguf, each optionally @revision')
            [CompletionResult]::new('--model', '--model', [CompletionResultType]::ParameterName, 'A local .gguf file or a Hugging Face repo: owner/repo, owner/repo:QUANT, owner/repo/file.gguf, each optionally @revision')
            [CompletionResult]::new('--ctx-size', '--ctx-size', [CompletionResultType]::ParameterName, 'Context size in tokens (prompt + answer); 0 means the model''s maximum')
            [CompletionResult]::new('--prompt-cache', '--prompt-cache', [CompletionResultType]::ParameterName, 'Where the prompt cache keeps the keys and values of prompts, so that a later prompt that starts the same way (the same piped document with another question, a long system prompt) skips computing that part; `off` turns it off [default: $XDG_CACHE_HOME/streamgen/prompts, or ~/.cache/streamgen/prompts]')
            [CompletionResult]::new('--prompt-cache-max', '--prompt-cache-max', [CompletionResultType]::ParameterName, 'The most the prompt cache folder holds (K, M, G); the least recently used prompts go first')
            [CompletionResult]::new('-t', '-t', [CompletionResultType]::ParameterName, 'Threads for the matrix kernels [default: the number of physical cores]')
            [CompletionResult]::new('--threads', '--threads', [CompletionResultType]::ParameterName, 'Threads for the matrix kernels [default: the number of physical cores]')
            [CompletionResult]::new('--draft-model', '--draft-model', [CompletionResultType]::ParameterName, 'A small model with the same vocabulary proposes the next tokens, checked by the model in one pass (a file, a Hub repo or repo:QUANT, as -m). Greedy output does not change; sampled output keeps its distribution')
            [CompletionResult]::new('--draft-max', '--draft-max', [CompletionResultType]::ParameterName, 'The most tokens proposed at once (by the draft model or the lookup); at most 14')
            [CompletionResult]::new('-n', '-n', [CompletionResultType]::ParameterName, 'Stop after N generated tokens [default: until the model ends or the context is full]')
            [CompletionResult]::new('--max-tokens', '--max-tokens', [CompletionResultType]::ParameterName, 'Stop after N generated tokens [default: until the model ends or the context is full]')
            [CompletionResult]::new('--logprobs', '--logprobs', [CompletionResultType]::ParameterName, 'With --json: each token''s log-probability under the model, and the N most likely tokens at its place (0 to 20), as the OpenAI API reports them')
            [CompletionResult]::new('--temperature', '--temperature', [CompletionResultType]::ParameterName, 'Sampling temperature; 0 always picks the most likely token (greedy)')
            [CompletionResult]::new('--top-k', '--top-k', [CompletionResultType]::ParameterName, 'Sample among the K most likely tokens; 0 disables [default: 40]')
            [CompletionResult]::new('--top-p', '--top-p', [CompletionResultType]::ParameterName, 'Sample among the most likely tokens whose probabilities add up to P; 1 disables')
            [CompletionResult]::new('--min-p', '--min-p', [CompletionResultType]::ParameterName, 'Drop tokens less likely than P times the most likely one; 0 disables [default: 0.05]')
            [CompletionResult]::new('--repeat-penalty', '--repeat-penalty', [CompletionResultType]::ParameterName, 'Penalize tokens seen in the last --repeat-last-n tokens; 1 disables [default: 1]')
            [CompletionResult]::new('--repeat-last-n', '--repeat-last-n', [CompletionResultType]::ParameterName, 'How many recent tokens the repeat penalty looks at')
            [CompletionResult]::new('--seed', '--seed', [CompletionResultType]::ParameterName, 'Random seed: the same seed and input give the same output [default: random]')
            [CompletionResult]::new('--stop', '--stop', [CompletionResultType]::ParameterName, 'End the answer before this text; it is never printed. Repeatable')
            [CompletionResult]::new('-s', '-s', [CompletionResultType]::ParameterName, 'A system message for chat models (folded into the first user turn where the template has no system role)')
            [CompletionResult]::new('--system', '--system', [CompletionResultType]::ParameterName, 'A system message for chat models (folded into the first user turn where the template has no system role)')
            [CompletionResult]::new('--chat-template', '--chat-template', [CompletionResultType]::ParameterName, 'Use this chat template instead of the model''s: a built-in name (gemma, chatml, llama3) or a Jinja file')
            [CompletionResult]::new('--reasoning', '--reasoning', [CompletionResultType]::ParameterName, 'Where a reasoning model''s thinking goes: hide, stderr (dimmed on a terminal) or stdout (between <think> and </think>; with --json, as "reasoning" objects) [default: stderr when it is a terminal, else hide; with --json, stdout]')
            [CompletionResult]::new('--cid', '--cid', [CompletionResultType]::ParameterName, 'Continue conversation ID of the log (as --logs shows it)')
            [CompletionResult]::new('--logs', '--logs', [CompletionResultType]::ParameterName, 'Print the last N exchanges of the log (as JSON Lines with --json), then exit')
            [CompletionResult]::new('--logs-search', '--logs-search', [CompletionResultType]::ParameterName, 'Print the logged exchanges that contain every word of TEXT (best match last), then exit')
            [CompletionResult]::new('--logs-delete', '--logs-delete', [CompletionResultType]::ParameterName, 'Delete conversation ID from the log (or every one, with --all), then exit')
            [CompletionResult]::new('--endpoint', '--endpoint', [CompletionResultType]::ParameterName, 'Send the requests to this OpenAI-compatible server (its base URL, such as http://gpu-box:8000/v1) instead of running the model here [env: STREAMGEN_ENDPOINT]')
            [CompletionResult]::new('--api-key', '--api-key', [CompletionResultType]::ParameterName, 'The server''s API key, sent as a bearer token [env: STREAMGEN_API_KEY]')
            [CompletionResult]::new('--parallel', '--parallel', [CompletionResultType]::ParameterName, 'With --each-line, how many lines are answered at once [default: 15 here on CPUs with AVX-512 VNNI, else 8 (one batched decode step for all of them); 4 requests in flight with --endpoint]')
            [CompletionResult]::new('--json-schema', '--json-schema', [CompletionResultType]::ParameterName, 'The answer is JSON valid against this JSON Schema, given inline or as @FILE; ''{}'' allows any JSON value. JSON is written on one line')
            [CompletionResult]::new('--schema', '--schema', [CompletionResultType]::ParameterName, 'The answer is a JSON object with these fields (llm''s concise syntax): ''name, age int, bio: a short bio''. Types are int, float, bool and str (the default); a description goes after a colon; fields are separated by commas, or by newlines when there are any')
            [CompletionResult]::new('--grammar', '--grammar', [CompletionResultType]::ParameterName, 'The answer matches this grammar: Lark (llguidance''s dialect; see docs/structured-output.md) or GBNF, llama.cpp''s format')
            [CompletionResult]::new('--regex', '--regex', [CompletionResultType]::ParameterName, 'The whole answer matches this regular expression (Rust regex syntax)')
            [CompletionResult]::new('--choice', '--choice', [CompletionResultType]::ParameterName, 'The answer is exactly one of these strings, separated by commas')
            [CompletionResult]::new('--idle-timeout', '--idle-timeout', [CompletionResultType]::ParameterName, 'Give up when the server sends nothing for this many seconds')
            [CompletionResult]::new('--offline', '--offline', [CompletionResultType]::ParameterName, 'Never touch the network: use only local files and the cache')
            [CompletionResult]::new('--no-prompt-cache', '--no-prompt-cache', [CompletionResultType]::ParameterName, 'Neither read nor write the prompt cache')
            [CompletionResult]::new('--lookup', '--lookup', [CompletionResultType]::ParameterName, 'Speculate from the text so far (prompt lookup): proposals copied from earlier text are checked in one pass. Greedy output does not change; sampled output keeps its distribution but not a seed''s draws [default: on with --temperature 0]')
            [CompletionResult]::new('--no-lookup', '--no-lookup', [CompletionResultType]::ParameterName, 'Never speculate from the text so far')
            [CompletionResult]::new('--ignore-eos', '--ignore-eos', [CompletionResultType]::ParameterName, 'Generate exactly -n tokens: the model''s end-of-generation tokens are text like any other (for benchmarks, and to force a length)')
            [CompletionResult]::new('--raw', '--raw', [CompletionResultType]::ParameterName, 'Plain completion of the prompt text, without a chat template')
            [CompletionResult]::new('--no-think', '--no-think', [CompletionResultType]::ParameterName, 'Ask a reasoning model to answer without thinking first: the chat template is rendered with enable_thinking=false (Qwen3; sent as chat_template_kwargs with --endpoint)')
            [CompletionResult]::new('--each-line', '--each-line', [CompletionResultType]::ParameterName, 'Treat each line of standard input as a separate prompt, and write exactly one line of output per input line (newlines in an answer are written as \n, backslashes as \\)')
            [CompletionResult]::new('--count-tokens', '--count-tokens', [CompletionResultType]::ParameterName, 'Print how many tokens the prompt is (after the chat template, as -v shows it), then exit without generating; with --each-line, one count per line. Reads only the model''s vocabulary')
            [CompletionResult]::new('--tokenize', '--tokenize', [CompletionResultType]::ParameterName, 'Print the prompt''s token ids as a JSON array (`[1, 2, 3]`), then exit without generating; with --each-line, one array per line. Reads only the model''s vocabulary')
            [CompletionResult]::new('--verbose-prompt', '--verbose-prompt', [CompletionResultType]::ParameterName, 'Print the exact prompt given to the model (after the chat template) and its token ids, as `[1, 2, 3]`, on stderr')
            [CompletionResult]::new('--no-stream', '--no-stream', [CompletionResultType]::ParameterName, 'Print the whole answer once, at the end, instead of streaming it')
            [CompletionResult]::new('--json', '--json', [CompletionResultType]::ParameterName, 'Write JSON Lines: one object per streamed chunk, then one with the finish reason, token counts and timings')
            [CompletionResult]::new('-x', '-x', [CompletionResultType]::ParameterName, 'Write only the contents of the answer''s first fenced code block (``` lines), streamed; the answer ends with the block. Nothing, and a note on stderr, when there is none')
            [CompletionResult]::new('--extract', '--extract', [CompletionResultType]::ParameterName, 'Write only the contents of the answer''s first fenced code block (``` lines), streamed; the answer ends with the block. Nothing, and a note on stderr, when there is none')
            [CompletionResult]::new('--stats', '--stats', [CompletionResultType]::ParameterName, 'After the answer, print token counts, speeds, time to first token and load time on stderr')
            [CompletionResult]::new('-q', '-q', [CompletionResultType]::ParameterName, 'Print no progress or informational lines on stderr; errors still print')
            [CompletionResult]::new('--quiet', '--quiet', [CompletionResultType]::ParameterName, 'Print no progress or informational lines on stderr; errors still print')
            [CompletionResult]::new('-c', '-c', [CompletionResultType]::ParameterName, 'Continue the latest conversation in the log: the model sees its earlier turns (and its system prompt, unless -s gives another)')
            [CompletionResult]::new('--continue', '--continue', [CompletionResultType]::ParameterName, 'Continue the latest conversation in the log: the model sees its earlier turns (and its system prompt, unless -s gives another)')
            [CompletionResult]::new('-i', '-i', [CompletionResultType]::ParameterName, 'A chat in the terminal: line editing and history, each answer streamed; Ctrl-C stops an answer, Ctrl-D leaves; /clear, /system TEXT, /save FILE. Also what plain `streamgen` opens when stdin and stdout are both terminals')
            [CompletionResult]::new('--interactive', '--interactive', [CompletionResultType]::ParameterName, 'A chat in the terminal: line editing and history, each answer streamed; Ctrl-C stops an answer, Ctrl-D leaves; /clear, /system TEXT, /save FILE. Also what plain `streamgen` opens when stdin and stdout are both terminals')
            [CompletionResult]::new('--no-log', '--no-log', [CompletionResultType]::ParameterName, 'Do not log this exchange (every exchange is logged in $XDG_STATE_HOME/streamgen/logs.db unless STREAMGEN_LOG=0)')
            [CompletionResult]::new('--all', '--all', [CompletionResultType]::ParameterName, 'With --logs-delete: delete every conversation')
            [CompletionResult]::new('--json-object', '--json-object', [CompletionResultType]::ParameterName, 'The answer is a JSON object')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help (see more with ''--help'')')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help (see more with ''--help'')')
            [CompletionResult]::new('-V', '-V ', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('--version', '--version', [CompletionResultType]::ParameterName, 'Print version')
            break
        }
    })

    $completions.Where{ $_.CompletionText -like "$wordToComplete*" } |
        Sort-Object -Property ListItemText
}
