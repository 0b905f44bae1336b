//! What the benchmarks write: a products table (a text description, a numeric price) and rows
//! inserted in one transaction, sized by environment variables.

/// `key` from the environment as a number, or `default`.
pub fn env_or(key: &str, default: u64) -> u64 {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

pub async fn create_table(client: &tokio_postgres::Client, table: &str) {
    client
        .batch_execute(&format!(
            "CREATE TABLE {table} (id bigint PRIMARY KEY, name text NOT NULL, price numeric(10,2) NOT NULL, \
             stock int NOT NULL, description text NOT NULL, updated_at timestamptz NOT NULL DEFAULT now())"
        ))
        .await
        .expect("create the bench table");
}

/// One transaction inserting ids `first..first + rows`.
pub async fn insert_rows(client: &tokio_postgres::Client, table: &str, first: u64, rows: u64) {
    client
        .batch_execute(&format!(
            "INSERT INTO {table} (id, name, price, stock, description)
             SELECT g, 'product ' || g, (g % 10000) / 100.0, g % 500, repeat(md5(g::text), 4)
             FROM generate_series({first}, {}) g",
            first + rows - 1
        ))
        .await
        .expect("insert the bench rows");
}
