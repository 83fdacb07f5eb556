"""Flag parsing shared by the command-line scripts (train, eval, demo,
export, convert): a bad flag or config override is one `error:` line."""

import sys

from absl import flags


def parse_flags(argv):
  """absl's flag parsing, with config override errors as one line.

  For `app.run(main, flags_parser=parse_flags)`. A misspelt key
  (--config.optim.lrr=1) raises AttributeError inside ml_collections (the
  config is locked): printed as one line naming the flag, exit status 1.
  """
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    print(f'error: {e} (see --helpfull)', file=sys.stderr)
    sys.exit(1)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    text = ' '.join(str(e.args[0] if e.args else e).strip("'").split())
    text = text.replace("\\'", "'").replace('\\n', ' ')
    bad = [a.split('=')[0] for a in argv[1:]
           if a.startswith('--config.') and
           text.strip('"\'').split("'")[0] in a]
    where = f'{bad[0]}: ' if bad else ''
    print(f'error: {where}no such config key or bad value ({text})',
          file=sys.stderr)
    sys.exit(1)
