"""What the command-line scripts (train, eval, demo, export, convert) share.

`run(main)` instead of `app.run(main)`: flags parsed with `parse_flags` (a
bad flag, config override or config file is one `error:` line, before JAX
starts), library INFO chatter off the console (`quiet_library_logs`), and
Ctrl-C as one line with exit status 130. `checked_config` range-checks a
config (ae_jax/config_checks.py) before any work.
"""

import logging as std_logging
import os
import sys
import threading
import traceback
from typing import Any, Callable, Optional, Sequence

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags

from ae_jax import config_checks

# Exit status of a run stopped by Ctrl-C (128 + SIGINT, as a shell reports).
INTERRUPTED_EXIT_CODE = 130
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _is_config_flag(flag) -> bool:
  """Whether `flag` is a config_flags config (through its public API)."""
  try:
    config_flags.get_config_filename(flag)
  except TypeError:
    return False
  except flags.Error:  # a config flag, not parsed yet
    return True
  return True


def _config_args(argv: Sequence[str]) -> dict:
  """{flag name: the file given} for the config-file flags in argv."""
  names = [name for name in flags.FLAGS
           if _is_config_flag(flags.FLAGS[name])]
  found = {}
  for i, arg in enumerate(argv):
    for name in names:
      for prefix in (f'--{name}', f'-{name}'):
        if arg == prefix and i + 1 < len(argv):
          found[name] = argv[i + 1]
        elif arg.startswith(prefix + '='):
          found[name] = arg[len(prefix) + 1:]
  return found


def _config_file_error(e: BaseException, name: str, path: str
                       ) -> Optional[str]:
  """One line for an error raised by the config file itself, else None."""
  file = os.path.abspath(path.split(':', 1)[0])
  where = f'--{name} {path}'
  if isinstance(e, SyntaxError) and e.filename and os.path.abspath(
      e.filename) == file:
    return f'{where}: syntax error at line {e.lineno}: {e.msg}'
  text = str(e)
  if isinstance(e, AttributeError) and "attribute 'get_config'" in text:
    return (f'{where} defines no get_config() (a config file defines '
            'get_config() returning an ml_collections.ConfigDict, as '
            'configs/default.py)')
  lines = [f for f in traceback.extract_tb(e.__traceback__)
           if os.path.abspath(f.filename) == file]
  if lines:
    return (f'{where}: get_config() raised {type(e).__name__} at line '
            f'{lines[-1].lineno}: {text}')
  if 'Error whilst parsing config file' in text:
    # config_flags re-raises TypeError / ValueError with the traceback text.
    last = [l for l in text.splitlines() if l.strip()][-1]
    return f'{where}: get_config() raised {last.strip()}'
  return None


def parse_flags(argv):
  """absl's flag parsing, with every flag and config error as one line.

  For `app.run(main, flags_parser=parse_flags)` (`run` does that). A
  misspelt key (--config.optim.lrr=1) raises AttributeError inside
  ml_collections (the config is locked); a config file that is missing,
  does not parse, has no get_config() or fails in it is named with the
  cause. Each is printed as one line, exit status 1.
  """
  def fail(text):
    print(f'error: {text}', file=sys.stderr)
    sys.exit(1)

  configs = _config_args(argv)
  for name, path in configs.items():
    if not os.path.isfile(path.split(':', 1)[0]):
      fail(f'--{name} {path}: no such file')
  try:
    rest = flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except
    for name, path in configs.items():
      line = _config_file_error(e, name, path)
      if line:
        fail(line)
      if f'--{name}=None' in str(e):
        fail(f'--{name} {path}: get_config() returned None')
    if isinstance(e, flags.Error):
      fail(f'{e} (see --helpfull)')
    if not isinstance(e, (AttributeError, KeyError, TypeError, ValueError)):
      raise
    text = ' '.join(str(e.args[0] if e.args else e).strip("'").split())
    text = text.replace("\\'", "'").replace('\\n', ' ')
    bad = [a.split('=')[0] for a in argv[1:]
           if a.startswith('--config.') and
           text.strip('"\'').split("'")[0] in a]
    where = f'{bad[0]}: ' if bad else ''
    fail(f'{where}no such config key or bad value ({text})')
  for name in flags.FLAGS:
    flag = flags.FLAGS[name]
    if not _is_config_flag(flag) or isinstance(flag.value,
                                               ml_collections.ConfigDict):
      continue
    path = config_flags.get_config_filename(flag)
    if not os.path.isfile(path.split(':', 1)[0]):  # the default's
      fail(f'--{name} {path} (the default): no such file here, in '
           f'{os.getcwd()}; pass --{name}')
    try:  # a config that failed to load raises its error when read
      getattr(flag.value, 'keys')
      problem = (f'get_config() returned {type(flag.value).__name__}, not '
                 'an ml_collections.ConfigDict')
    except IOError as e:
      problem = 'cannot be loaded: ' + ' '.join(str(e).split())
    fail(f'--{name} {path}: {problem}')
  return rest


def checked_config(config: ml_collections.ConfigDict, *, train: bool = False
                   ) -> ml_collections.ConfigDict:
  """`config` after config_checks (train: every key; else model and test).

  Raises:
    SystemExit: one `error:` line naming the key and its valid range.
  """
  try:
    if train:
      config_checks.check_train_config(config)
    else:
      config_checks.check_inference_config(config)
  except config_checks.ConfigError as e:
    raise SystemExit(f'error: {e}') from None
  return config


def checkpoint_line(path: str, step: Optional[int] = None) -> str:
  """What eval, demo and export say of the checkpoint they read (orbax's
  own dozens of lines are hidden): its path and, for a train workdir, the
  step (None: not known to the caller)."""
  return f'checkpoint {path}' + ('' if step is None else f', step {step}')


def _ours_or_warning(record: std_logging.LogRecord) -> bool:
  """Keeps warnings and errors, and INFO lines of ae_jax and the script."""
  return (record.levelno >= std_logging.WARNING or
          record.pathname.startswith(_PACKAGE_DIR) or
          os.path.abspath(record.pathname) == os.path.abspath(sys.argv[0]))


def quiet_library_logs() -> None:
  """Drops the INFO lines of libraries (orbax: dozens per checkpoint; jax,
  TF) from the console, unless --verbosity >= 1 asks for them."""
  if logging.get_verbosity() < 1:
    logging.get_absl_handler().addFilter(_ours_or_warning)


def interruptible(fn: Callable[..., Any], *args,
                  interrupted: str = 'interrupted (Ctrl-C)', **kwargs) -> Any:
  """`fn(*args, **kwargs)` run so that Ctrl-C ends the process at once.

  Python sees a SIGINT only between bytecodes of the main thread, so during
  a long native call (an XLA compile: minutes) Ctrl-C would wait for the
  call to end. `fn` runs in a thread; the main thread waits, and on Ctrl-C
  prints `error: {interrupted}` and exits 130 (nothing to save). The
  result or exception of `fn` is returned or raised here.
  """
  result = {}

  def target():
    try:
      result['value'] = fn(*args, **kwargs)
    except BaseException as e:  # pylint: disable=broad-except
      result['error'] = e

  thread = threading.Thread(target=target, daemon=True, name=fn.__name__)
  thread.start()
  try:
    while thread.is_alive():
      thread.join(0.2)
  except KeyboardInterrupt:
    logging.flush()
    print(f'error: {interrupted}', file=sys.stderr)
    sys.stderr.flush()
    os._exit(INTERRUPTED_EXIT_CODE)  # the thread may be in native code
  if 'error' in result:
    raise result['error']
  return result['value']


def run(main: Callable[[list], Optional[int]],
        interrupted: str = 'interrupted (Ctrl-C)') -> None:
  """app.run(main) with `parse_flags`, quiet logs, Ctrl-C as one line.

  A KeyboardInterrupt (Ctrl-C, SIGINT) that reaches here ends the process
  with the line `error: {interrupted}` and exit status 130. (train.py's
  loop catches SIGINT itself to save the current step first.)
  """
  def wrapped(argv):
    quiet_library_logs()
    try:
      return main(argv)
    except KeyboardInterrupt:
      logging.flush()
      print(f'error: {interrupted}', file=sys.stderr)
      sys.exit(INTERRUPTED_EXIT_CODE)

  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  # TF (tf.data, jax2tf tracing: no TF math runs here) prints 4 start-up
  # lines about oneDNN otherwise, whatever the level above.
  os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
  app.run(wrapped, flags_parser=parse_flags)
