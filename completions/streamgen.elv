
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
            cand -c 'Context size in tokens (prompt + answer); 0 means the model''s maximum'
            cand --ctx-size 'Context size in tokens (prompt + answer); 0 means the model''s maximum'
            cand -t 'Threads for the matrix kernels [default: the number of physical cores]'
            cand --threads 'Threads for the matrix kernels [default: the number of physical cores]'
            cand -n 'Stop after N generated tokens [default: until the model ends or the context is full]'
            cand --max-tokens 'Stop after N generated tokens [default: until the model ends or the context is full]'
            cand --temperature 'Sampling temperature; 0 always picks the most likely token (greedy)'
            cand --top-k 'Sample among the K most likely tokens; 0 disables'
            cand --top-p 'Sample among the most likely tokens whose probabilities add up to P; 1 disables'
            cand --min-p 'Drop tokens less likely than P times the most likely one; 0 disables'
            cand --repeat-penalty 'Penalize tokens seen in the last --repeat-last-n tokens; 1 disables'
            cand --repeat-last-n 'How many recent tokens the repeat penalty looks at'
            cand --seed 'Random seed: the same seed and input give the same output [default: random]'
            cand --offline 'Never touch the network: use only local files and the cache'
            cand --no-stream 'Print the whole answer once, at the end, instead of streaming it'
            cand --raw 'Plain completion of the prompt text, without a chat template'
            cand -q 'Print no progress or informational lines on stderr; errors still print'
            cand --quiet 'Print no progress or informational lines on stderr; errors still print'
            cand -h 'Print help'
            cand --help 'Print help'
            cand -V 'Print version'
            cand --version 'Print version'
        }
    ]
    $completions[$command]
}
