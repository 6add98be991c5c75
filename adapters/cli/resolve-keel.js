// Lets a workflow file that is not inside a project with keel installed still `import ... from 'keel'`:
// when normal resolution finds no package named keel, it resolves to the keel running this command.
let entry;

export function initialize(data) {
  entry = data.entry;
}

export async function resolve(specifier, context, next) {
  try {
    return await next(specifier, context);
  } catch (error) {
    if (specifier === 'keel' && error?.code === 'ERR_MODULE_NOT_FOUND') return next(entry, context);
    throw error;
  }
}
